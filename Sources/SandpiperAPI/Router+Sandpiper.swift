import Hummingbird
import SandpiperCore
import SandpiperSessions

/// The whole HTTP surface: error mapping first (so it also shapes 401s and unknown routes),
/// then authentication, then the routes.
public func buildRouter(sessions: SessionManager, apiKey: String) -> Router<BasicRequestContext> {
    let router = Router()
    router.add(middleware: ErrorMiddleware())
    router.add(middleware: AuthMiddleware(apiKey: apiKey))
    router.get("/healthz") { _, _ in "ok\n" }
    DataPlaneController<BasicRequestContext>(sessions: sessions).register(on: router)
    return router
}
