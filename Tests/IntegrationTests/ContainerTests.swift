import Foundation
import SandpiperCore
import SandpiperImages
import SandpiperSessions
import Testing

@testable import SandpiperSandbox

#if canImport(Glibc)
    import Glibc
#endif

/// The tiers custom containers run on here: crun always, gVisor (runsc) when this host can.
let containerTiers: [IsolationTier] = tiers.contains(.gvisor) ? [.namespaces, .gvisor] : [.namespaces]

/// Custom container sessions with a real image (busybox-static's httpd and two CGI scripts,
/// built with umoci, imported into the image store) run by crun.
@Suite("Custom containers", .enabled(if: integrationEnabled), .serialized)
struct ContainerTests {
    static let script = #"""
        set -e
        L="$1"; B="$L/bundle"
        umoci init --layout "$L/layout"
        umoci new --image "$L/layout:web"
        umoci unpack --image "$L/layout:web" "$B" >/dev/null
        R="$B/rootfs"
        mkdir -p "$R/bin" "$R/www/cgi-bin"
        cp /bin/busybox "$R/bin/busybox"; ln -s busybox "$R/bin/sh"
        echo hello > "$R/www/index.html"
        cat > "$R/www/cgi-bin/state" <<'CGI'
        #!/bin/sh
        printf 'Content-Type: text/plain\r\n\r\n'
        if [ "$REQUEST_METHOD" = POST ]; then cat > /tmp/state; fi
        echo "state=$(cat /tmp/state 2>/dev/null)"
        CGI
        cat > "$R/www/cgi-bin/net" <<'CGI'
        #!/bin/sh
        printf 'Content-Type: text/plain\r\n\r\n'
        echo "links=$(busybox ip -o link | busybox awk -F': ' '{print $2}' | busybox tr '\n' ' ')"
        set -- $(echo "$QUERY_STRING" | busybox tr ':' ' ')
        if busybox nc -w 2 "$1" "$2" </dev/null >/dev/null 2>&1; then echo reach=yes; else echo reach=no; fi
        echo "uid=$(busybox id -u)"
        CGI
        cat > "$R/www/cgi-bin/kernel" <<'CGI'
        #!/bin/sh
        printf 'Content-Type: text/plain\r\n\r\n'
        cat /proc/version
        busybox dmesg 2>&1 | busybox head -n 3
        CGI
        chmod 755 "$R/www/cgi-bin/state" "$R/www/cgi-bin/net" "$R/www/cgi-bin/kernel"
        umoci repack --image "$L/layout:web" "$B"
        umoci config --image "$L/layout:web" --config.entrypoint /bin/sh --config.cmd -c \
            --config.cmd 'busybox httpd -f -p 8080 -h /www; exit 3'
        """#

    static func run(_ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = arguments
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw SandpiperError.internalError("building the test image failed (\(process.terminationStatus))")
        }
    }

    /// A fixture whose backend knows the image `script` builds (into `$1/layout`, tag `web`;
    /// `$2` is the test fixtures directory) as pool `pool`'s.
    static func fixture(script: String = script, pool: String = "web") async throws -> Fixture {
        let fixture = try Fixture()
        do {
            try await build(fixture, script: script, pool: pool)
        } catch {
            await fixture.tearDown()
            throw error
        }
        return fixture
    }

    /// Runs `body` with a fresh `fixture(script:pool:)` and always tears it down (its state
    /// directory, and whatever its sessions left).
    static func withFixture(
        script: String = script,
        pool: String = "web",
        _ body: (Fixture) async throws -> Void
    ) async throws {
        try await fixture(script: script, pool: pool).use(body)
    }

    private static func build(_ fixture: Fixture, script: String, pool: String) async throws {
        let work = fixture.stateDirectory + "-image"
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().path + "/Fixtures"
        try run(["-c", script, "build-image", work, fixtures])
        let store = try ImageStore(dataDirectory: fixture.stateDirectory)
        try await store.importArchive(work + "/layout", name: "local/\(pool):test")
        let resolved = try await store.resolve("local/\(pool):test")
        fixture.backend.register(
            image: ContainerImage(
                name: resolved.record.name,
                digest: resolved.record.manifestDigest.description,
                lowerDirectories: resolved.layerDirectories.reversed(),
                entrypoint: resolved.config.entrypoint ?? [],
                cmd: resolved.config.cmd ?? [],
                environment: resolved.config.env,
                workingDirectory: resolved.config.workingDir,
                user: resolved.config.user
            ),
            forPool: pool
        )
    }

    static func pool(
        startupProbe: ContainerProbe? = nil,
        cooldown: Int = 300,
        isolation: IsolationTier = .namespaces
    ) -> PoolConfiguration {
        var pool = Fixture.pool(name: "web", cooldown: cooldown)
        pool.type = .customContainer
        pool.isolation = isolation
        pool.container = ContainerTemplate(image: "local/web:test", targetPort: 8080, startupProbe: startupProbe)
        return pool
    }

    /// One HTTP/1.0 exchange over a connection made in the container's network namespace.
    static func request(_ sandbox: ContainerSandbox, _ method: String, _ path: String, body: String = "") async throws
        -> String
    {
        let fd = try await sandbox.connect(timeout: .seconds(5))
        defer { close(fd) }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let text = "\(method) \(path) HTTP/1.0\r\nHost: x\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count <= 0 { break }
            response += buffer[0..<count]
        }
        return String(decoding: response, as: UTF8.self)
    }

    func launch(_ fixture: Fixture, _ pool: PoolConfiguration) async throws -> ContainerSandbox {
        let sandbox = try await fixture.backend.launch(SandboxSpec(id: UUID().uuidString.lowercased(), pool: pool))
        return try #require(sandbox as? ContainerSandbox)
    }

    /// Nothing of the container is left: processes (the session uid's, and crun's or runsc's,
    /// which name the session directory), mounts, cgroups, directory.
    func expectGone(_ sandbox: ContainerSandbox, _ fixture: Fixture) async {
        var left: [Int32] = []
        for _ in 0..<100 {
            left = fixture.processes(uid: sandbox.uid) + fixture.processes(commandContaining: sandbox.directory)
            if left.isEmpty { break }
            try? await Task.sleep(for: .milliseconds(20))
        }
        #expect(left.isEmpty, "processes left: \(left)")
        #expect(fixture.mounts(under: sandbox.directory).isEmpty, "mounts left")
        // (The directory is gone, so nothing is mounted in it any more.)
        for dir in fixture.backend.cgroups.directories(for: sandbox.id) {
            #expect(!FileManager.default.fileExists(atPath: dir), "cgroup left: \(dir)")
        }
        #expect(!FileManager.default.fileExists(atPath: sandbox.directory))
    }

    @Test(
        "two sessions get two containers with separate state; requests reach the right one",
        arguments: containerTiers
    )
    func separateState(isolation: IsolationTier) async throws {
        try await Self.withFixture { fixture in
            let pool = SessionPool(
                configuration: Self.pool(isolation: isolation),
                backend: fixture.backend,
                logger: fixture.logger
            )
            let a = try #require(
                try await pool.session(for: SessionIdentifier(validating: "alpha-1")).sandbox as? ContainerSandbox
            )
            let b = try #require(
                try await pool.session(for: SessionIdentifier(validating: "bravo-2")).sandbox as? ContainerSandbox
            )
            #expect(a.id != b.id && a.uid != b.uid)
            #expect(try await Self.request(a, "GET", "/index.html").contains("hello"))
            _ = try await Self.request(a, "POST", "/cgi-bin/state", body: "from-a")
            _ = try await Self.request(b, "POST", "/cgi-bin/state", body: "from-b")
            #expect(try await Self.request(a, "GET", "/cgi-bin/state").contains("state=from-a"))
            #expect(try await Self.request(b, "GET", "/cgi-bin/state").contains("state=from-b"))
            let again = try #require(
                try await pool.session(for: SessionIdentifier(validating: "alpha-1")).sandbox as? ContainerSandbox
            )
            #expect(again.id == a.id)
            if isolation == .namespaces {
                // The container's processes run as the session's own host uid.
                #expect(!fixture.processes(uid: a.uid).isEmpty)
            }
            await pool.shutdown()
            await expectGone(a, fixture)
            await expectGone(b, fixture)
        }
    }

    @Test("the container sees only lo and reaches neither the host nor other sessions", arguments: containerTiers)
    func network(isolation: IsolationTier) async throws {
        try await Self.withFixture { fixture in
            // A server on the host, on every address.
            let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(listener) }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = 0
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafeMutablePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(listener, $0, length) == 0 && listen(listener, 8) == 0
                        && getsockname(listener, $0, &length) == 0
                }
            }
            #expect(bound)
            let port = UInt16(bigEndian: address.sin_port)
            let a = try await launch(fixture, Self.pool(isolation: isolation))
            let b = try await launch(fixture, Self.pool(isolation: isolation))
            let toHost = try await Self.request(a, "GET", "/cgi-bin/net?127.0.0.1:\(port)")
            // gVisor: eth0 links to the namespace the host connects from, where nothing listens.
            // (in either order: gVisor lists them either way)
            let links = toHost.split(whereSeparator: \.isNewline).first { $0.hasPrefix("links=") }?.dropFirst(6)
                .split(separator: " ").map(String.init).sorted()
            #expect(links == (isolation == .gvisor ? ["eth0", "lo"] : ["lo"]), "\(toHost)")
            #expect(toHost.contains("reach=no"), "\(toHost)")
            #expect(toHost.contains("uid=0"), "\(toHost)")
            // Nothing connected to the host's listener (it would be waiting in the backlog).
            #expect(Self.pendingConnections(listener) == 0)
            // Another container's port 8080 is not this one's: its 127.0.0.1:8080 is itself.
            let toSelf = try await Self.request(a, "GET", "/cgi-bin/net?127.0.0.1:8080")
            #expect(toSelf.contains("reach=yes"), "\(toSelf)")
            let toOther = try await Self.request(a, "GET", "/cgi-bin/net?10.0.2.100:8080")
            #expect(toOther.contains("reach=no"), "\(toOther)")
            let toProxySide = try await Self.request(a, "GET", "/cgi-bin/net?169.254.1.1:\(port)")
            #expect(toProxySide.contains("reach=no"), "\(toProxySide)")
            #expect(Self.pendingConnections(listener) == 0)
            await a.destroy()
            await b.destroy()
            await expectGone(a, fixture)
            await expectGone(b, fixture)
        }
    }

    @Test(
        "a gVisor pool runs its containers on gVisor's kernel, reachable like any other, and leaves nothing",
        .enabled(if: containerTiers.contains(.gvisor))
    )
    func gvisor() async throws {
        try await Self.withFixture { fixture in
            let pool = SessionPool(
                configuration: Self.pool(isolation: .gvisor),
                backend: fixture.backend,
                logger: fixture.logger
            )
            let sandbox = try #require(
                try await pool.session(for: SessionIdentifier(validating: "gvisor-1")).sandbox as? ContainerSandbox
            )
            #expect(try await Self.request(sandbox, "GET", "/index.html").contains("hello"))
            // gVisor's kernel says so in its log; the host's would refuse `dmesg` (seccomp) under crun.
            let kernel = try await Self.request(sandbox, "GET", "/cgi-bin/kernel")
            #expect(kernel.contains("Starting gVisor"), "\(kernel)")
            // On the host: runsc's sandbox process (the sentry) runs in the session's cgroups, and no
            // process of the container runs on the host's kernel as the session uid.
            let commands = fixture.backend.cgroups.pids(sandboxID: sandbox.id).map { pid in
                String(decoding: FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") ?? Data(), as: UTF8.self)
            }
            #expect(commands.contains { $0.hasPrefix("runsc-sandbox") }, "\(commands)")
            #expect(!commands.contains { $0.hasPrefix("busybox") }, "\(commands)")
            #expect(fixture.processes(uid: sandbox.uid).isEmpty)
            await pool.shutdown()
            await expectGone(sandbox, fixture)
            #expect(!FileManager.default.fileExists(atPath: sandbox.directory + "/runsc"))
        }
    }

    /// Connections waiting in `listener`'s backlog (accepted and closed here).
    static func pendingConnections(_ listener: Int32) -> Int {
        let flags = fcntl(listener, F_GETFL)
        _ = fcntl(listener, F_SETFL, flags | O_NONBLOCK)
        var count = 0
        while case let fd = accept(listener, nil, nil), fd >= 0 {
            close(fd)
            count += 1
        }
        return count
    }

    @Test("a container that exits ends its session; the next call gets a new one")
    func crash() async throws {
        try await Self.withFixture { fixture in
            let pool = SessionPool(configuration: Self.pool(), backend: fixture.backend, logger: fixture.logger)
            let identifier = try SessionIdentifier(validating: "crash-1")
            let first = try #require(try await pool.session(for: identifier).sandbox as? ContainerSandbox)
            // Kill httpd (not pid 1): the container's shell then exits 3, and crun with it.
            let httpd = fixture.backend.cgroups.pids(sandboxID: first.id).filter { pid in
                let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") ?? Data()
                return String(decoding: cmdline, as: UTF8.self).hasPrefix("busybox\0httpd")
            }
            #expect(!httpd.isEmpty)
            for pid in httpd { kill(pid, SIGKILL) }
            for _ in 0..<100 where first.isAlive { try await Task.sleep(for: .milliseconds(20)) }
            #expect(!first.isAlive)

            await first.destroy()
            await expectGone(first, fixture)

            do {
                _ = try await first.connect(timeout: .seconds(1))
                Issue.record("connected to an exited container")
            } catch let error as SandpiperError {
                #expect(error.code == "ContainerUnreachable")
            }
            let second = try #require(try await pool.session(for: identifier).sandbox as? ContainerSandbox)
            #expect(second.id != first.id)
            #expect(try await Self.request(second, "GET", "/index.html").contains("hello"))

            await pool.shutdown()
            await expectGone(second, fixture)
        }
    }

    @Test("a failing startup probe gives a clear error and leaves nothing")
    func startupProbeFails() async throws {
        try await Self.withFixture { fixture in
            let probe = ContainerProbe(
                action: .httpGet(path: "/missing", port: 8080),
                periodSeconds: 1,
                failureThreshold: 2
            )
            do {
                _ = try await launch(fixture, Self.pool(startupProbe: probe))
                Issue.record("a container whose startup probe fails was started")
            } catch let error as SandpiperError {
                #expect(error.code == "ContainerStartupProbeFailed", "\(error)")
                #expect(error.message.contains("/missing"))
            }
            let sessions =
                (try? FileManager.default.contentsOfDirectory(atPath: fixture.stateDirectory + "/sessions")) ?? []
            #expect(sessions.isEmpty)
            #expect(fixture.backend.cgroups.leftoverSandboxIDs().isEmpty)
        }
    }

    @Test("cooldown removes the container, its overlay and its cgroups")
    func cooldown() async throws {
        try await Self.withFixture { fixture in
            let pool = SessionPool(
                configuration: Self.pool(cooldown: 1),
                backend: fixture.backend,
                logger: fixture.logger
            )
            let sandbox = try #require(
                try await pool.session(for: SessionIdentifier(validating: "cool-1")).sandbox as? ContainerSandbox
            )
            // The root is an overlayfs while the session lives.
            let files = FileManager.default
            let outer = try files.attributesOfItem(atPath: sandbox.directory)[.systemNumber] as? Int
            let root = try files.attributesOfItem(atPath: sandbox.directory + "/rootfs")[.systemNumber] as? Int
            #expect(outer != nil && outer != root, "the session's root is not a mount of its own")
            try await Task.sleep(for: .milliseconds(1500))
            let reaped = await pool.reapExpired()
            #expect(reaped.count == 1)
            await expectGone(sandbox, fixture)
            await pool.shutdown()
        }
    }
}
