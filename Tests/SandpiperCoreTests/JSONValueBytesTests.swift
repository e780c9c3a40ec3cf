import Foundation
import SandpiperCore
import Testing

/// `JSONValue.parse` and `serialized` replace Foundation's Codable path on every request and agent
/// frame: they must accept and reject the same texts and read the same values.
@Suite struct JSONValueBytesTests {
    static let accepted = [
        #"{"properties":{"codeInputType":"inline","executionType":"synchronous","code":"1+1"}}"#,
        #"[2.0, 1e2, 1.5, 9007199254740993, -0.0, 12345678901234567890, 0.1, 1E-7, -5, 1e-400]"#,
        #"["a\u00e9\ud83d\ude00\/\"\\\b\f\n\r\t", "plain é 😀", ""]"#,
        #"{"a":1,"a":2}"#,
        #"[1,]"#,
        #"{"a":1,}"#,
        "\u{FEFF}[1]",
        " \t\r\n{ \"k\" : [ true , false , null ] } \n",
        #""top""#,
        "5",
        "-0",
        #"{"nested":{"deeper":[[[{"x":[]}]]],"empty":{}}}"#,
        #"[-9223372036854775808, 9223372036854775807, 9223372036854775808, 1.7976931348623157e308]"#,
        "[-9223372036854775809, 4.5e15, 4503599627370497.5, 1.0e-5, 100000000000000000000000, 9007199254740993.0]",
        "[1e-400, -1e-400, 1e15, 123456789012345678.0, 2.50, 0.000, -0.0e0]",
    ]

    static let rejected = [
        "", " ", "[1e400]", #"["\ud800"]"#, #"["\udc00x"]"#, #"["\ud800\u0041"]"#, "[01]", "[1.]", "[.5]", "[+1]",
        " \u{FEFF}[1]", "[\"\u{1}\"]", "[NaN]", "[Infinity]", "[-]", #"["\x"]"#, "[1] x", "[tru]", "[nul]",
        "{\"a\"}", "{\"a\" 1}", "{1:2}", "[1 2]", "[", "{", "\"open", #"["\u12"]"#, "[1e]", "[1e+]", "[--1]",
        "{,}", "[,]", "[1,,]", "'a'",
    ]

    static func foundation(_ text: String) -> JSONValue? {
        try? JSONDecoder().decode(JSONValue.self, from: Data(text.utf8))
    }

    @Test(arguments: accepted)
    func acceptsWhatFoundationAccepts(_ text: String) throws {
        let expected = try #require(Self.foundation(text))
        #expect(try JSONValue.parse(Array(text.utf8)) == expected)
    }

    @Test(arguments: rejected)
    func rejectsWhatFoundationRejects(_ text: String) {
        #expect(Self.foundation(text) == nil)
        #expect(throws: JSONValue.ParseError.self) { try JSONValue.parse(Array(text.utf8)) }
    }

    @Test func rejectsInvalidUTF8InStrings() {
        for bytes: [UInt8] in [
            [0x22, 0xFF, 0x22], [0x22, 0xC3, 0x22], [0x22, 0xED, 0xA0, 0x80, 0x22], [0x22, 0x5C, 0x6E, 0xFE, 0x22],
        ] {
            #expect(throws: JSONValue.ParseError.self) { try JSONValue.parse(bytes) }
        }
    }

    @Test func limitsNesting() throws {
        let deepest =
            String(repeating: "[", count: JSONValue.maxDepth) + String(repeating: "]", count: JSONValue.maxDepth)
        #expect(throws: Never.self) { try JSONValue.parse(Array(deepest.utf8)) }
        let deeper = "[" + deepest + "]"
        let error = try #require(throws: JSONValue.ParseError.self) { try JSONValue.parse(Array(deeper.utf8)) }
        #expect(error.reason == "nested too deeply")
        let objects = String(repeating: #"{"a":"#, count: JSONValue.maxDepth) + "1"
        let closed = objects + String(repeating: "}", count: JSONValue.maxDepth)
        #expect(throws: Never.self) { try JSONValue.parse(Array(closed.utf8)) }
        let deeperObjects = #"{"a":"# + closed + "}"
        #expect(throws: JSONValue.ParseError.self) { try JSONValue.parse(Array(deeperObjects.utf8)) }
        // A hostile depth is an error, not a stack overflow.
        let hostile = String(repeating: "{\"a\":", count: 200_000)
        #expect(throws: JSONValue.ParseError.self) { try JSONValue.parse(Array(hostile.utf8)) }
    }

    @Test func wholeNumbersAreIntegersWhateverTheirSpelling() throws {
        #expect(try JSONValue.parse(Array("2.0".utf8)) == .integer(2))
        #expect(try JSONValue.parse(Array("1e2".utf8)) == .integer(100))
        #expect(try JSONValue.parse(Array("1.5".utf8)) == .number(1.5))
        #expect(try JSONValue.parse(Array("18446744073709551616".utf8)) == .number(18446744073709551616.0))
    }

    @Test func reportsWhereTheTextBroke() throws {
        let error = try #require(throws: JSONValue.ParseError.self) {
            try JSONValue.parse(Array(#"{"a": [1, 2 3]}"#.utf8))
        }
        #expect(error.offset == 12)
        #expect(error.description.contains("byte 12"))
    }

    static let values: [JSONValue] = [
        .object([
            "text": .string("q\"\\/\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é😀\u{2028}"),
            "numbers": .array([
                .number(0.1), .number(1e20), .number(1.5e-7), .number(-0.0), .number(123456789.125), .number(2),
            ]),
            "integers": .array([.integer(-3), .integer(.max), .integer(.min)]),
            "flags": .array([.bool(true), .bool(false), .null]),
            "nested": .object(["empty": .object([:]), "list": .array([])]),
        ]),
        .string(""),
        .integer(0),
    ]

    @Test(arguments: values)
    func serializedTextReadsBackTheSameEverywhere(_ value: JSONValue) throws {
        let text = value.serialized(sortedKeys: true)
        #expect(try JSONValue.parse(text) == value.normalized)
        #expect(try JSONDecoder().decode(JSONValue.self, from: Data(text)) == value.normalized)
        _ = try JSONSerialization.jsonObject(with: Data(text), options: [.fragmentsAllowed])
    }

    @Test func serializesLikeTheResponsesEncoder() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let value: JSONValue = .object([
            "b": .string("a/b \"q\" \\ \n\t\u{1} é"),
            "a": .array([.integer(1), .bool(true), .null, .number(2.5), .number(3)]),
            "c": .object(["z": .integer(-1), "y": .string("")]),
        ])
        #expect(
            String(decoding: value.serialized(sortedKeys: true), as: UTF8.self)
                == String(decoding: try encoder.encode(value), as: UTF8.self)
        )
    }

    @Test func nonFiniteNumbersBecomeNull() {
        #expect(JSONValue.array([.number(.nan), .number(.infinity)]).serialized() == Array("[null,null]".utf8))
    }
}

extension JSONValue {
    /// What reading the value back gives: whole Doubles read as integers.
    fileprivate var normalized: JSONValue {
        switch self {
        case .number(let value): Int64(exactly: value).map(JSONValue.integer) ?? self
        case .array(let values): .array(values.map(\.normalized))
        case .object(let fields): .object(fields.mapValues(\.normalized))
        default: self
        }
    }
}
