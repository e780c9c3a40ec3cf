import Foundation
import HTTPTypes
import Hummingbird
import Logging
import SandpiperCore

/// The one place where errors become HTTP responses: `{"error":{"code","message"}}` plus an
/// `x-ms-error-code` header, as Azure's data plane answers. Nothing escapes as a bare 500.
public struct ErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    public init() {}

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response)
        async throws
        -> Response
    {
        do {
            return try await next(request, context)
        } catch let error as SandpiperError {
            if error.kind == .internalError {
                context.logger.error("request failed", metadata: ["error": "\(error.message)"])
            }
            return Self.response(for: error)
        } catch let error as HTTPError {
            let mapped: SandpiperError
            switch error.status {
            case .notFound:
                mapped = .notFound("no such route: \(request.method) \(request.uri.path)", code: "RouteNotFound")
            case .contentTooLarge:
                mapped = SandpiperError(.payloadTooLarge, code: "RequestBodyTooLarge", "the request body is too large")
            case .badRequest:
                mapped = .invalid(error.body ?? "bad request")
            case .methodNotAllowed:
                mapped = SandpiperError(
                    .invalidArgument,
                    code: "MethodNotAllowed",
                    "method \(request.method) is not allowed here"
                )
            default:
                return Self.response(
                    status: error.status,
                    code: error.status.reasonPhrase.replacingOccurrences(of: " ", with: ""),
                    message: error.body ?? error.status.reasonPhrase
                )
            }
            var response = Self.response(for: mapped)
            if error.status == .methodNotAllowed { response.status = .methodNotAllowed }
            return response
        } catch is CancellationError {
            return Self.response(
                for: SandpiperError(.unavailable, code: "RequestCancelled", "the request was cancelled")
            )
        } catch {
            context.logger.error("unexpected error", metadata: ["error": "\(error)"])
            return Self.response(for: .internalError("internal error: \(type(of: error))"))
        }
    }

    static func status(for kind: SandpiperError.Kind) -> HTTPResponse.Status {
        switch kind {
        case .invalidArgument: .badRequest
        case .unauthorized: .unauthorized
        case .notFound, .maxSessionsReached: .notFound
        case .payloadTooLarge: .contentTooLarge
        case .sandboxFailure: .badGateway
        case .timeout: .gatewayTimeout
        case .unavailable: .serviceUnavailable
        case .unsupported: .notImplemented
        case .conflict: .conflict
        case .internalError: .internalServerError
        }
    }

    public static func response(for error: SandpiperError) -> Response {
        var response = response(status: status(for: error.kind), code: error.code, message: error.message)
        if error.kind == .unauthorized {
            response.headers[.wwwAuthenticate] = "Bearer"
        }
        return response
    }

    static func response(status: HTTPResponse.Status, code: String, message: String) -> Response {
        let body: JSONValue = .object(["error": .object(["code": .string(code), "message": .string(message)])])
        var response = JSONResponse.make(body, status: status)
        response.headers[.xMsErrorCode] = code
        return response
    }
}

extension HTTPField.Name {
    static let xMsErrorCode = known("x-ms-error-code")
    static let operationID = known("operation-id")
    static let operationLocation = known("Operation-Location")

    /// A header name spelled in this source file: always valid.
    private static func known(_ name: String) -> Self {
        guard let field = Self(name) else { preconditionFailure("invalid header name \(name)") }
        return field
    }
}

enum JSONResponse {
    /// A JSON body with its keys sorted (a stable text for clients and tests).
    static func make(_ value: JSONValue, status: HTTPResponse.Status = .ok) -> Response {
        Response(
            status: status,
            headers: [.contentType: "application/json; charset=utf-8"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: value.serialized(sortedKeys: true)))
        )
    }
}
