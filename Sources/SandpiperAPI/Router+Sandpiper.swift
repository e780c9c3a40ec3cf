import Foundation
import Hummingbird
import SandpiperCore
import SandpiperSessions

/// The whole HTTP surface: error mapping first (so it also shapes 401s and unknown routes),
/// then authentication, then the routes.
public func buildRouter(
    sessions: SessionManager,
    apiKey: String,
    scheme: String = "http"
) -> Router<SandpiperRequestContext> {
    let router = Router(context: SandpiperRequestContext.self)
    router.add(middleware: ErrorMiddleware())
    router.add(middleware: AuthMiddleware(apiKey: apiKey))
    router.get("/healthz") { _, _ in "ok\n" }
    let openAPI = OpenAPIDocument.load()
    router.get("/openapi.json") { _, _ in
        Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: openAPI))
    }
    DataPlaneController<SandpiperRequestContext>(sessions: sessions, scheme: scheme).register(on: router)
    return router
}

/// The OpenAPI 3 description of everything served (kept in Resources/openapi.json).
enum OpenAPIDocument {
    static func load() -> ByteBuffer {
        guard let url = Bundle.module.url(forResource: "openapi", withExtension: "json"),
            let data = try? Data(contentsOf: url)
        else { return ByteBuffer(string: "{}") }
        return ByteBuffer(bytes: data)
    }
}
