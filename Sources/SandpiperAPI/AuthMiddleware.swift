import Foundation
import HTTPTypes
import Hummingbird
import SandpiperCore

/// Requires `Authorization: Bearer <key>` on every route but the health probe and the API description. The comparison
/// takes the same time wherever the first difference is.
public struct AuthMiddleware<Context: RequestContext>: RouterMiddleware {
    let expected: [UInt8]

    public init(apiKey: String) {
        self.expected = Array(apiKey.utf8)
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response)
        async throws
        -> Response
    {
        if request.uri.path == "/healthz" || request.uri.path == "/openapi.json" {
            return try await next(request, context)
        }
        guard let header = request.headers[.authorization] else {
            throw SandpiperError(.unauthorized, code: "Unauthorized", "missing 'Authorization: Bearer <key>' header")
        }
        let prefix = "bearer "
        guard header.count > prefix.count, header.prefix(prefix.count).lowercased() == prefix else {
            throw SandpiperError(.unauthorized, code: "Unauthorized", "the Authorization header must be 'Bearer <key>'")
        }
        let token = Array(header.dropFirst(prefix.count).trimmingCharacters(in: .whitespaces).utf8)
        guard Self.constantTimeEqual(token, expected) else {
            throw SandpiperError(.unauthorized, code: "Unauthorized", "the bearer token is not valid for this server")
        }
        return try await next(request, context)
    }

    static func constantTimeEqual(_ lhs: [UInt8], _ rhs: [UInt8]) -> Bool {
        var difference = UInt8(truncatingIfNeeded: lhs.count ^ rhs.count)
        let count = max(lhs.count, rhs.count)
        for index in 0..<count {
            let left = index < lhs.count ? lhs[index] : 0
            let right = index < rhs.count ? rhs[index] : 0
            difference |= left ^ right
        }
        return difference == 0
    }
}
