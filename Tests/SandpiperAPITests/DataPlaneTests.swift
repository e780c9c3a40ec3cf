import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import SandpiperAPI
import SandpiperCore
import SandpiperSessions
import SandpiperTestSupport
import Synchronization
import Testing

let testKey = "test-key-0123456789abcdef"

struct Harness {
    let backend = FakeBackend()
    let sessions: SessionManager
    let router: Router<SandpiperRequestContext>

    init(
        pools: [PoolConfiguration] = [
            PoolConfiguration(name: "python", readySessionInstances: 0, maxConcurrentSessions: 2)
        ]
    ) {
        let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        let backend = self.backend
        sessions = SessionManager(
            pools: pools.map { SessionPool(configuration: $0, backend: backend, logger: logger) },
            backends: [backend],
            logger: logger
        )
        router = buildRouter(sessions: sessions, apiKey: testKey)
    }

    func test(_ body: @Sendable (any TestClientProtocol) async throws -> Void) async throws {
        let app = Application(router: router)
        try await app.test(.router, body)
    }
}

let auth: HTTPFields = [.authorization: "Bearer \(testKey)", .contentType: "application/json"]

func json(_ buffer: ByteBuffer) throws -> [String: Any] {
    try #require(JSONSerialization.jsonObject(with: Data(buffer.readableBytesView)) as? [String: Any])
}

func errorCode(_ response: TestResponse) throws -> String? {
    let body = try json(response.body)
    return (body["error"] as? [String: Any])?["code"] as? String
}

@Suite("Legacy data plane over HTTP (fake sandboxes)")
struct DataPlaneTests {
    @Test("code/execute answers the exact legacy shape, for wrapped and flat bodies")
    func executeShape() async throws {
        try await Harness().test { client in
            for body in [
                #"{"properties":{"codeInputType":"inline","executionType":"synchronous","code":"1+1"}}"#,
                #"{"code":"1+1"}"#,
            ] {
                try await client.execute(
                    uri: "/pools/python/code/execute?api-version=2024-02-02-preview&identifier=abcd-1",
                    method: .post,
                    headers: auth,
                    body: ByteBuffer(string: body)
                ) { response in
                    #expect(response.status == .ok)
                    let object = try json(response.body)
                    #expect(object["$id"] as? String == "1")
                    let properties = try #require(object["properties"] as? [String: Any])
                    #expect(properties["status"] as? String == "Success")
                    #expect(properties["stdout"] as? String == "ran: 1+1\n")
                    #expect(properties["stderr"] as? String == "")
                    #expect(properties["result"] as? Int == 3)
                    #expect(properties["executionResult"] as? Int == 3)
                    #expect(properties["executionTimeInMilliseconds"] as? Int == 1)
                }
            }
        }
    }

    @Test("A failing cell is a 200 with status Failure, not an HTTP error")
    func failure() async throws {
        try await Harness().test { client in
            try await client.execute(
                uri: "/pools/python/code/execute?identifier=abcd-2",
                method: .post,
                headers: auth,
                body: ByteBuffer(string: #"{"properties":{"code":"fail"}}"#)
            ) { response in
                #expect(response.status == .ok)
                let properties = try #require(try json(response.body)["properties"] as? [String: Any])
                #expect(properties["status"] as? String == "Failure")
                #expect((properties["stderr"] as? String)?.contains("Traceback") == true)
                #expect(properties["result"] as? String == "")
            }
        }
    }

    @Test("timeoutInSeconds is capped by the pool and defaults when absent")
    func timeouts() async throws {
        var pool = PoolConfiguration(name: "python", readySessionInstances: 0)
        pool.maxExecutionSeconds = 30
        pool.defaultExecutionSeconds = 20
        let harness = Harness(pools: [pool])
        let backend = harness.backend
        try await harness.test { client in
            for (body, expected) in [
                (#"{"code":"a","timeoutInSeconds":100}"#, 30.0), (#"{"code":"b"}"#, 20.0),
                (#"{"code":"c","timeoutInSeconds":"5"}"#, 5.0),
            ] {
                try await client.execute(
                    uri: "/pools/python/code/execute?identifier=tmo-1",
                    method: .post,
                    headers: auth,
                    body: ByteBuffer(string: body)
                ) {
                    #expect($0.status == .ok)
                }
                let last = backend.sandboxes.withLock { $0.last }
                #expect(last?.executions.withLock { $0.last?.timeoutSeconds } == expected)
            }
            try await client.execute(
                uri: "/pools/python/code/execute?identifier=tmo-1",
                method: .post,
                headers: auth,
                body: ByteBuffer(string: #"{"code":"x","timeoutInSeconds":0}"#)
            ) {
                #expect($0.status == .badRequest)
            }
        }
    }

    @Test("Every route requires the bearer key and answers 401 in the Azure error shape")
    func unauthorized() async throws {
        try await Harness().test { client in
            for headers: HTTPFields in [
                [:], [.authorization: "Bearer wrong-key-wrong-key"], [.authorization: "Basic \(testKey)"],
                [.authorization: "Bearer \(testKey)x"],
            ] {
                try await client.execute(uri: "/pools/python/files?identifier=abcd", method: .get, headers: headers) {
                    response in
                    #expect(response.status == .unauthorized)
                    #expect(response.headers[HTTPField.Name("x-ms-error-code")!] == "Unauthorized")
                    try #expect(errorCode(response) == "Unauthorized")
                }
            }
            try await client.execute(uri: "/healthz", method: .get) { #expect($0.status == .ok) }
        }
    }

    @Test("Bad input is a 400 with a JSON error, never a 500")
    func badInput() async throws {
        try await Harness().test { client in
            let cases: [(String, String, String)] = [
                ("/pools/python/code/execute?identifier=abc", #"{"code":"1"}"#, "InvalidSessionIdentifier"),
                ("/pools/python/code/execute", #"{"code":"1"}"#, "InvalidSessionIdentifier"),
                ("/pools/python/code/execute?identifier=has%20space", #"{"code":"1"}"#, "InvalidSessionIdentifier"),
                ("/pools/python/code/execute?identifier=abcd", "not json", "InvalidRequestBody"),
                ("/pools/python/code/execute?identifier=abcd", "[1,2]", "InvalidRequestBody"),
                ("/pools/python/code/execute?identifier=abcd", "", "InvalidRequestBody"),
                ("/pools/python/code/execute?identifier=abcd", #"{"properties":{}}"#, "SessionPropertiesMissing"),
                ("/pools/python/code/execute?identifier=abcd", #"{"code":42}"#, "InvalidRequestBody"),
                (
                    "/pools/python/code/execute?identifier=abcd", #"{"code":"1","codeInputType":"Telepathy"}"#,
                    "InvalidRequestBody"
                ),
            ]
            for (uri, body, code) in cases {
                try await client.execute(uri: uri, method: .post, headers: auth, body: ByteBuffer(string: body)) {
                    response in
                    #expect(response.status == .badRequest, "\(uri) \(body)")
                    try #expect(errorCode(response) == code, "\(uri) \(body)")
                }
            }
        }
    }

    @Test("A body that is not JSON says where it stopped being JSON")
    func badJSONSaysWhere() async throws {
        try await Harness().test { client in
            let body = ByteBuffer(string: #"{"code": "1" "executionType": "synchronous"}"#)
            try await client.execute(
                uri: "/pools/python/code/execute?identifier=abcd",
                method: .post,
                headers: auth,
                body: body
            ) { response in
                #expect(response.status == .badRequest)
                let error = try json(response.body)["error"] as? [String: Any]
                let message = try #require(error?["message"] as? String)
                #expect(
                    message
                        == "the request body is not valid JSON: invalid JSON at byte 13: expected ',' or '}' in an object"
                )
            }
        }
    }

    @Test("Unknown routes and pools are 404 JSON")
    func notFound() async throws {
        try await Harness().test { client in
            for uri in [
                "/nothing", "/pools/python/code/run?identifier=abcd", "/pools/ghost/code/execute?identifier=abcd",
            ] {
                try await client.execute(uri: uri, method: .post, headers: auth, body: ByteBuffer(string: "{}")) {
                    response in
                    #expect(response.status == .notFound, "\(uri)")
                    try #expect(errorCode(response) != nil)
                }
            }
        }
    }

    @Test("The ARM-style prefix and the python/* aliases reach the same session")
    func aliases() async throws {
        let harness = Harness()
        let backend = harness.backend
        try await harness.test { client in
            for uri in [
                "/pools/python/code/execute?identifier=same-one",
                "/subscriptions/s1/resourceGroups/g1/sessionPools/python/code/execute?identifier=same-one",
                "/pools/python/python/execute?identifier=same%2Done",
            ] {
                try await client.execute(
                    uri: uri,
                    method: .post,
                    headers: auth,
                    body: ByteBuffer(string: #"{"code":"1"}"#)
                ) {
                    #expect($0.status == .ok, "\(uri)")
                }
            }
            #expect(backend.counters.launched == 1)
            #expect(backend.sandboxes.withLock { $0.first?.executions.withLock { $0.count } } == 3)
        }
    }

    @Test("At maxConcurrentSessions a new identifier gets 404 SessionPoolMaxSessionsReached")
    func maxSessions() async throws {
        try await Harness().test { client in
            for identifier in ["first", "second"] {
                try await client.execute(
                    uri: "/pools/python/code/execute?identifier=\(identifier)",
                    method: .post,
                    headers: auth,
                    body: ByteBuffer(string: #"{"code":"1"}"#)
                ) {
                    #expect($0.status == .ok)
                }
            }
            try await client.execute(
                uri: "/pools/python/code/execute?identifier=third",
                method: .post,
                headers: auth,
                body: ByteBuffer(string: #"{"code":"1"}"#)
            ) { response in
                #expect(response.status == .notFound)
                try #expect(errorCode(response) == "SessionPoolMaxSessionsReached")
                #expect(response.headers[HTTPField.Name("x-ms-error-code")!] == "SessionPoolMaxSessionsReached")
            }
        }
    }

    static func multipart(boundary: String, filename: String, content: String) -> ByteBuffer {
        ByteBuffer(
            string: "--\(boundary)\r\nContent-Disposition: form-data; name=\"file\"; filename=\"\(filename)\"\r\n"
                + "Content-Type: application/octet-stream\r\n\r\n\(content)\r\n--\(boundary)--\r\n"
        )
    }

    @Test("Upload strips /mnt/data/, lists, downloads and deletes; SK's application/json multipart works")
    func files() async throws {
        let harness = Harness()
        try await harness.test { client in
            let boundary = "XyZ123boundary"
            try await client.execute(
                uri: "/pools/python/files/upload?identifier=file-sess",
                method: .post,
                headers: [
                    .authorization: "Bearer \(testKey)", .contentType: "multipart/form-data; boundary=\(boundary)",
                ],
                body: Self.multipart(boundary: boundary, filename: "/mnt/data/data.csv", content: "a,b\n1,2\n")
            ) { response in
                #expect(response.status == .ok)
                let value = try #require(try json(response.body)["value"] as? [[String: Any]])
                let properties = try #require(value.first?["properties"] as? [String: Any])
                #expect(properties["filename"] as? String == "data.csv")
                #expect(properties["size"] as? Int == 8)
                #expect(properties["lastModifiedTime"] is String)
            }
            // Semantic Kernel: a multipart body labelled application/json, no boundary parameter.
            try await client.execute(
                uri: "/pools/python/files/upload?identifier=file-sess",
                method: .post,
                headers: auth,
                body: Self.multipart(boundary: "sk-boundary-42", filename: "/mnt/data/sub dir/ñ.txt", content: "sk!")
            ) { #expect($0.status == .ok) }
            try await client.execute(uri: "/pools/python/files?identifier=file-sess", method: .get, headers: auth) {
                response in
                let value = try #require(try json(response.body)["value"] as? [[String: Any]])
                let names = value.compactMap { ($0["properties"] as? [String: Any])?["filename"] as? String }
                #expect(names == ["data.csv", "sub dir/ñ.txt"])
            }
            try await client.execute(
                uri: "/pools/python/files/content/sub%20dir/%C3%B1.txt?identifier=file-sess",
                method: .get,
                headers: auth
            ) { response in
                #expect(response.status == .ok)
                #expect(String(buffer: response.body) == "sk!")
            }
            try await client.execute(
                uri: "/pools/python/python/downloadFile?filename=data.csv&identifier=file-sess",
                method: .get,
                headers: auth
            ) { response in
                #expect(String(buffer: response.body) == "a,b\n1,2\n")
                #expect(response.headers[.contentType] == "text/csv")
            }
            try await client.execute(
                uri: "/pools/python/files/data.csv?identifier=file-sess",
                method: .delete,
                headers: auth
            ) {
                #expect($0.status == .ok)
            }
            try await client.execute(
                uri: "/pools/python/files/content/data.csv?identifier=file-sess",
                method: .get,
                headers: auth
            ) { response in
                #expect(response.status == .notFound)
                try #expect(errorCode(response) == "FileNotFound")
            }
            for uri in [
                "/pools/python/files/content/..%2F..%2Fetc%2Fpasswd?identifier=file-sess",
                "/pools/python/files/content/a/../../b?identifier=file-sess",
            ] {
                try await client.execute(uri: uri, method: .get, headers: auth) { response in
                    #expect(response.status == .badRequest || response.status == .notFound, "\(uri)")
                    #expect(!String(buffer: response.body).contains("root:"))
                }
            }
        }
    }

    @Test("Uploads over the pool limit are 413; a body without a file part is 400")
    func uploadLimits() async throws {
        var pool = PoolConfiguration(name: "python", readySessionInstances: 0)
        pool.maxUploadBytes = 10
        try await Harness(pools: [pool]).test { client in
            try await client.execute(
                uri: "/pools/python/files/upload?identifier=limit-1",
                method: .post,
                headers: [.authorization: "Bearer \(testKey)", .contentType: "multipart/form-data; boundary=b0und"],
                body: Self.multipart(boundary: "b0und", filename: "big.bin", content: String(repeating: "x", count: 11))
            ) { response in
                #expect(response.status == .contentTooLarge)
                try #expect(errorCode(response) == "FileTooLarge")
            }
            try await client.execute(
                uri: "/pools/python/files/upload?identifier=limit-1",
                method: .post,
                headers: [.authorization: "Bearer \(testKey)", .contentType: "multipart/form-data; boundary=b0und"],
                body: ByteBuffer(
                    string: "--b0und\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nhi\r\n--b0und--\r\n"
                )
            ) { response in
                #expect(response.status == .badRequest)
                try #expect(errorCode(response) == "InvalidMultipartBody")
            }
            try await client.execute(
                uri: "/pools/python/files/upload?identifier=limit-1",
                method: .post,
                headers: auth,
                body: ByteBuffer(string: "{}")
            ) {
                #expect($0.status == .badRequest)
            }
        }
    }
}
