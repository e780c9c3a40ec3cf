import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import SandpiperCore
import SandpiperTestSupport
import Synchronization
import Testing

let modern = "api-version=2025-10-02-preview"

@Suite("Modern data plane over HTTP (fake sandboxes)")
struct ModernDataPlaneTests {
    @Test("POST executions: flat body, Succeeded, result object, operation-id and Operation-Location headers")
    func synchronous() async throws {
        let harness = Harness()
        let backend = harness.backend
        try await harness.test { client in
            var headers = auth
            headers[HTTPField.Name("operation-id")!] = "my-op-1"
            try await client.execute(
                uri: "/pools/python/executions?\(modern)&identifier=exec-1",
                method: .post,
                headers: headers,
                body: ByteBuffer(string: #"{"code":"abc","outputStreamsMaxLength":100}"#)
            ) { response in
                #expect(response.status == .ok)
                #expect(response.headers[HTTPField.Name("operation-id")!] == "my-op-1")
                #expect(
                    response.headers[HTTPField.Name("Operation-Location")!]
                        == "/pools/python/executions/my-op-1?api-version=2025-10-02-preview&identifier=exec-1"
                )
                let body = try json(response.body)
                #expect(body["id"] as? String == "my-op-1")
                #expect(body["identifier"] as? String == "exec-1")
                #expect(body["executionType"] as? String == "Synchronous")
                #expect(body["status"] as? String == "Succeeded")
                let result = try #require(body["result"] as? [String: Any])
                #expect(result["stdout"] as? String == "ran: abc\n")
                #expect(result["executionResult"] as? Int == 3)
                #expect(result["executionTimeInMilliseconds"] is Int)
            }
            #expect(backend.sandboxes.withLock { $0.first?.executions.withLock { $0.last?.outputLimit } } == 100)
            // Default per-stream cap is Azure's 4096; a properties wrapper is tolerated.
            try await client.execute(
                uri: "/pools/python/executions?\(modern)&identifier=exec-1",
                method: .post,
                headers: auth,
                body: ByteBuffer(string: #"{"properties":{"code":"fail","returnJupyterFormatExecutionResult":true}}"#)
            ) { response in
                #expect(response.status == .ok)
                try #expect(json(response.body)["status"] as? String == "Failed")
            }
            #expect(backend.sandboxes.withLock { $0.first?.executions.withLock { $0.last?.outputLimit } } == 4096)
        }
    }

    @Test("Asynchronous executions answer 202 Running and are polled to their result")
    func asynchronous() async throws {
        try await Harness().test { client in
            var headers = auth
            headers[HTTPField.Name("operation-id")!] = "slow-op"
            try await client.execute(
                uri: "/pools/python/executions?\(modern)&identifier=async-1",
                method: .post,
                headers: headers,
                body: ByteBuffer(string: #"{"code":"sleep:0.3","executionType":"asynchronous"}"#)
            ) { response in
                #expect(response.status == .accepted)
                let body = try json(response.body)
                #expect(body["status"] as? String == "Running")
                #expect(body["result"] == nil)
            }
            var final: [String: Any] = [:]
            for _ in 0..<50 {
                try await client.execute(
                    uri: "/pools/python/executions/slow-op?\(modern)&identifier=async-1",
                    method: .get,
                    headers: auth
                ) { response in
                    #expect(response.status == .ok)
                    final = try json(response.body)
                }
                if final["status"] as? String != "Running" { break }
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(final["status"] as? String == "Succeeded")
            #expect((final["result"] as? [String: Any])?["stdout"] as? String == "ran: sleep:0.3\n")
            // The same operation-id again is a conflict; an unknown one is 404.
            try await client.execute(
                uri: "/pools/python/executions?\(modern)&identifier=async-1",
                method: .post,
                headers: headers,
                body: ByteBuffer(string: #"{"code":"x","executionType":"Asynchronous"}"#)
            ) { #expect($0.status == .conflict) }
            try await client.execute(
                uri: "/pools/python/executions/nope?\(modern)&identifier=async-1",
                method: .get,
                headers: auth
            ) { response in
                #expect(response.status == .notFound)
                try #expect(errorCode(response) == "ExecutionNotFound")
            }
        }
    }

    @Test("Bad execution requests are 400 with a clear code")
    func badExecutions() async throws {
        try await Harness().test { client in
            for (body, code) in [
                (#"{"executionType":"Synchronous"}"#, "SessionPropertiesMissing"),
                (#"{"code":"1","executionType":"Eventually"}"#, "InvalidRequestBody"),
                (#"{"shellCommand":"ls"}"#, "InvalidRequestBody"),
                (#"{"code":"1","outputStreamsMaxLength":0}"#, "InvalidRequestBody"),
                (#"{"code":"1","returnJupyterFormatExecutionResult":"maybe"}"#, "InvalidRequestBody"),
            ] {
                try await client.execute(
                    uri: "/pools/python/executions?\(modern)&identifier=bad-1",
                    method: .post,
                    headers: auth,
                    body: ByteBuffer(string: body)
                ) { response in
                    #expect(response.status == .badRequest, "\(body)")
                    try #expect(errorCode(response) == code, "\(body)")
                }
            }
            var headers = auth
            headers[HTTPField.Name("operation-id")!] = "has/slash"
            try await client.execute(
                uri: "/pools/python/executions?\(modern)&identifier=bad-1",
                method: .post,
                headers: headers,
                body: ByteBuffer(string: #"{"code":"1"}"#)
            ) {
                #expect($0.status == .badRequest)
            }
        }
    }

    @Test("Modern files: upload returns one SessionResourceFile; list pages; content; delete is 204")
    func files() async throws {
        try await Harness().test { client in
            try await client.execute(
                uri: "/pools/python/files?\(modern)&identifier=mfiles&path=/mnt/data/docs",
                method: .post,
                headers: [.authorization: "Bearer \(testKey)", .contentType: "multipart/form-data; boundary=zz"],
                body: DataPlaneTests.multipart(boundary: "zz", filename: "notes.yaml", content: "a: 1\n")
            ) { response in
                #expect(response.status == .ok)
                let file = try json(response.body)
                #expect(file["name"] as? String == "notes.yaml")
                #expect(file["type"] as? String == "File")
                #expect(file["sizeInBytes"] as? Int == 5)
                #expect(file["contentType"] as? String == "application/yaml")
                #expect(file["directory"] as? String == "docs")
                #expect(file["lastModifiedAt"] is String)
            }
            try await client.execute(
                uri: "/pools/python/files?\(modern)&identifier=mfiles&recursive=true",
                method: .get,
                headers: auth
            ) { response in
                let body = try json(response.body)
                #expect(body.keys.contains("nextLink"))
                let names = (body["value"] as? [[String: Any]])?.compactMap { $0["name"] as? String }
                #expect(names == ["notes.yaml"])
            }
            try await client.execute(
                uri: "/pools/python/files/notes.yaml/content?\(modern)&identifier=mfiles&path=docs",
                method: .get,
                headers: auth
            ) { response in
                #expect(String(buffer: response.body) == "a: 1\n")
            }
            try await client.execute(
                uri: "/pools/python/files/notes.yaml?\(modern)&identifier=mfiles&path=docs",
                method: .get,
                headers: auth
            ) { response in
                try #expect(json(response.body)["sizeInBytes"] as? Int == 5)
            }
            try await client.execute(
                uri: "/pools/python/files/notes.yaml?\(modern)&identifier=mfiles&path=docs",
                method: .delete,
                headers: auth
            ) {
                #expect($0.status == .noContent)
            }
            try await client.execute(
                uri: "/pools/python/files/notes.yaml?\(modern)&identifier=mfiles&path=docs",
                method: .delete,
                headers: auth
            ) {
                #expect($0.status == .notFound)
            }
        }
    }

    @Test("Sessions: get, list, stop and delete; a deleted identifier gets a fresh session")
    func sessions() async throws {
        let harness = Harness()
        let backend = harness.backend
        try await harness.test { client in
            try await client.execute(
                uri: "/pools/python/session?\(modern)&identifier=sess-1",
                method: .get,
                headers: auth
            ) { response in
                #expect(response.status == .notFound)
                try #expect(errorCode(response) == "SessionNotFound")
            }
            try await client.execute(
                uri: "/pools/python/executions?\(modern)&identifier=sess-1",
                method: .post,
                headers: auth,
                body: ByteBuffer(string: #"{"code":"1"}"#)
            ) {
                #expect($0.status == .ok)
            }
            try await client.execute(
                uri: "/pools/python/session?\(modern)&identifier=sess-1",
                method: .get,
                headers: auth
            ) { response in
                let body = try json(response.body)
                #expect(body["identifier"] as? String == "sess-1")
                for key in ["createdAt", "lastAccessedAt", "expireAt", "etag"] {
                    #expect(body[key] is String, "\(key)")
                }
            }
            try await client.execute(uri: "/pools/python/listSessions?\(modern)", method: .get, headers: auth) {
                response in
                let sessions = try #require(try json(response.body)["sessions"] as? [[String: Any]])
                #expect(sessions.map { $0["identifier"] as? String } == ["sess-1"])
            }
            try await client.execute(
                uri: "/pools/python/session?\(modern)&identifier=sess-1",
                method: .delete,
                headers: auth
            ) {
                #expect($0.status == .noContent)
            }
            #expect(backend.counters.destroyed == 1)
            try await client.execute(
                uri: "/pools/python/session?\(modern)&identifier=sess-1",
                method: .delete,
                headers: auth
            ) {
                #expect($0.status == .noContent, "deleting twice is fine")
            }
            try await client.execute(
                uri: "/pools/python/executions?\(modern)&identifier=sess-1",
                method: .post,
                headers: auth,
                body: ByteBuffer(string: #"{"code":"1"}"#)
            ) {
                #expect($0.status == .ok)
            }
            #expect(backend.counters.launched == 2, "a fresh sandbox after the delete")
            try await client.execute(
                uri: "/pools/python/.management/stopSession?\(modern)&identifier=sess-1",
                method: .post,
                headers: auth
            ) { response in
                #expect(response.status == .ok)
                #expect(String(buffer: response.body) == #""Session sess-1 in session pool python stopped.""#)
            }
            try await client.execute(
                uri: "/pools/python/.management/stopSession?\(modern)&identifier=sess-1",
                method: .post,
                headers: auth
            ) {
                #expect($0.status == .notFound)
            }
        }
    }

    @Test("metadata lists the runtime and its packages as the sandbox reports them")
    func metadata() async throws {
        try await Harness().test { client in
            try await client.execute(uri: "/pools/python/metadata?\(modern)", method: .get, headers: auth) { response in
                #expect(response.status == .ok)
                let body = try json(response.body)
                let runtimes = try #require(body["runtimes"] as? [[String: Any]])
                #expect(runtimes.first?["name"] as? String == "python")
                #expect(runtimes.first?["version"] as? String == "3.11.2")
                let packages = try #require(body["preInstalledPackages"] as? [[String: Any]])
                #expect(packages.contains { $0["name"] as? String == "numpy" && $0["version"] as? String == "2.4.6" })
                #expect(body["jupyterKernel"] is [String: Any])
            }
        }
    }
}

@Suite("Shell pools over HTTP (fake sandboxes)")
struct ShellPoolAPITests {
    static func harness() -> Harness {
        Harness(pools: [PoolConfiguration(name: "bash", type: .shell, readySessionInstances: 0)])
    }

    @Test("The exit code is the status, as a string, in both API generations")
    func exitCodeStatus() async throws {
        let harness = Self.harness()
        try await harness.test { client in
            try await client.execute(
                uri: "/pools/bash/code/execute?identifier=sh-1",
                method: .post,
                headers: auth,
                body: ByteBuffer(string: #"{"properties":{"code":"exit:2"}}"#)
            ) { response in
                let properties = try #require(try json(response.body)["properties"] as? [String: Any])
                #expect(properties["status"] as? String == "2")
            }
            try await client.execute(
                uri: "/pools/bash/executions?\(modern)&identifier=sh-1",
                method: .post,
                headers: auth,
                body: ByteBuffer(string: #"{"shellCommand":"exit:0","stdin":"in"}"#)
            ) { response in
                let body = try json(response.body)
                #expect(body["status"] as? String == "0")
                #expect((body["result"] as? [String: Any])?["stdout"] as? String == "in")
            }
        }
    }

    @Test("execCommandAndArgs and its alias command are quoted for bash; code is refused with SessionPropertiesMissing")
    func commands() async throws {
        let harness = Self.harness()
        let backend = harness.backend
        try await harness.test { client in
            for body in [
                #"{"execCommandAndArgs":["echo","it's","a b","$HOME"]}"#, #"{"command":["echo","it's","a b","$HOME"]}"#,
            ] {
                try await client.execute(
                    uri: "/pools/bash/executions?\(modern)&identifier=sh-2",
                    method: .post,
                    headers: auth,
                    body: ByteBuffer(string: body)
                ) {
                    #expect($0.status == .ok)
                }
                let code = backend.sandboxes.withLock { $0.first?.executions.withLock { $0.last?.code } }
                #expect(code == #"echo 'it'\''s' 'a b' '$HOME'"#)
            }
            for (body, code) in [
                (#"{"code":"ls","codeInputType":"Inline"}"#, "SessionPropertiesMissing"),
                (#"{}"#, "SessionPropertiesMissing"),
                (#"{"shellCommand":"ls","execCommandAndArgs":["ls"]}"#, "InvalidRequestBody"),
                (#"{"execCommandAndArgs":[1,2]}"#, "InvalidRequestBody"),
                (#"{"execCommandAndArgs":[]}"#, "InvalidRequestBody"),
            ] {
                try await client.execute(
                    uri: "/pools/bash/executions?\(modern)&identifier=sh-2",
                    method: .post,
                    headers: auth,
                    body: ByteBuffer(string: body)
                ) { response in
                    #expect(response.status == .badRequest, "\(body)")
                    try #expect(errorCode(response) == code, "\(body)")
                }
            }
            #expect(backend.sandboxes.withLock { $0.first?.executions.withLock { $0.last?.outputLimit } } == 4096)
        }
    }
}
