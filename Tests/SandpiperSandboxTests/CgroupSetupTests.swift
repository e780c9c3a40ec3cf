import Foundation
import SandpiperCore
import Testing

@testable import SandpiperSandbox

/// Lines as this kind of machine prints them: v1 controllers plus an empty v2 mount (hybrid).
let hybridMountinfo = """
    31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
    35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
    39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
    """
let hybridSelf = """
    8:pids:/
    4:memory:/process_api/3fda7845
    1:cpu:/
    0::/
    """
let unifiedMountinfo = """
    25 21 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
    """

@Suite("Cgroups")
struct CgroupSetupTests {
    @Test("Hybrid host: v1 wins and the memory group nests under the server's own memory cgroup")
    func detectsV1() throws {
        let setup = try CgroupSetup.detect(mountinfo: hybridMountinfo, selfCgroup: hybridSelf)
        #expect(setup.version == .v1)
        #expect(setup.bases["memory"] == "/sys/fs/cgroup/memory/process_api/3fda7845/sandpiper")
        #expect(setup.bases["cpu"] == "/sys/fs/cgroup/cpu/sandpiper")
        #expect(setup.bases["pids"] == "/sys/fs/cgroup/pids/sandpiper")
    }

    @Test("Unified host: one v2 base under the server's own cgroup")
    func detectsV2() throws {
        let setup = try CgroupSetup.detect(
            mountinfo: unifiedMountinfo,
            selfCgroup: "0::/system.slice/sandpiper.service\n"
        )
        #expect(setup.version == .v2)
        #expect(setup.bases["unified"] == "/sys/fs/cgroup/system.slice/sandpiper.service/sandpiper")
    }

    @Test("No cgroups at all is a clear error")
    func noCgroups() {
        #expect(throws: SandpiperError.self) { try CgroupSetup.detect(mountinfo: "", selfCgroup: "") }
    }

    /// A fake cgroupfs: plain directories and files under a temp root.
    func fakeTree(_ body: (String) throws -> Void) throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("cgfake-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: root) }
        try body(root)
    }

    @Test("v2 against a fake tree: controllers enabled, limits written, groups removed")
    func v2Lifecycle() throws {
        try fakeTree { root in
            let setup = try CgroupSetup.detect(
                mountinfo: unifiedMountinfo,
                selfCgroup: "0::/system.slice/sandpiper.service\n",
                root: root
            )
            try setup.prepare()
            let base = root + "/sys/fs/cgroup/system.slice/sandpiper.service/sandpiper"
            #expect(
                try String(contentsOfFile: base + "/cgroup.subtree_control", encoding: .utf8) == "+memory +cpu +pids"
            )
            #expect(
                try String(
                    contentsOfFile: root + "/sys/fs/cgroup/system.slice/sandpiper.service/cgroup.subtree_control",
                    encoding: .utf8
                )
                    == "+memory +cpu +pids"
            )
            let limits = SessionLimits(memoryBytes: 512 << 20, cpus: 0.5, pids: 64)
            let procs = try setup.create(sandboxID: "sbx1", limits: limits)
            #expect(procs == [base + "/sbx1/cgroup.procs"])
            #expect(try String(contentsOfFile: base + "/sbx1/memory.max", encoding: .utf8) == "536870912")
            #expect(try String(contentsOfFile: base + "/sbx1/memory.swap.max", encoding: .utf8) == "0")
            #expect(try String(contentsOfFile: base + "/sbx1/cpu.max", encoding: .utf8) == "50000 100000")
            #expect(try String(contentsOfFile: base + "/sbx1/pids.max", encoding: .utf8) == "64")
            try "oom 2\noom_kill 1\n".write(toFile: base + "/sbx1/memory.events", atomically: true, encoding: .utf8)
            #expect(setup.oomKills(sandboxID: "sbx1") == 1)
            #expect(setup.leftoverSandboxIDs() == ["sbx1"])
            setup.killAndRemove(sandboxID: "sbx1")
            #expect(!FileManager.default.fileExists(atPath: base + "/sbx1"))
            #expect(
                try String(contentsOfFile: base + "/cgroup.subtree_control", encoding: .utf8) == "+memory +cpu +pids"
            )
        }
    }

    @Test("v1 against a fake tree: one group per controller with v1 limit files")
    func v1Lifecycle() throws {
        try fakeTree { root in
            let setup = try CgroupSetup.detect(mountinfo: hybridMountinfo, selfCgroup: hybridSelf, root: root)
            try setup.prepare()
            let memory = root + "/sys/fs/cgroup/memory/process_api/3fda7845/sandpiper/s2"
            try FileManager.default.createDirectory(atPath: memory, withIntermediateDirectories: true)
            // Swap accounting is on when the memsw file exists: it must get the same limit.
            FileManager.default.createFile(atPath: memory + "/memory.memsw.limit_in_bytes", contents: nil)
            let procs = try setup.create(
                sandboxID: "s2",
                limits: SessionLimits(memoryBytes: 1 << 30, cpus: 1.5, pids: 100)
            )
            #expect(procs.count == 3)
            #expect(try String(contentsOfFile: memory + "/memory.limit_in_bytes", encoding: .utf8) == "1073741824")
            #expect(
                try String(contentsOfFile: memory + "/memory.memsw.limit_in_bytes", encoding: .utf8) == "1073741824"
            )
            #expect(
                try String(contentsOfFile: root + "/sys/fs/cgroup/cpu/sandpiper/s2/cpu.cfs_quota_us", encoding: .utf8)
                    == "150000"
            )
            #expect(
                try String(contentsOfFile: root + "/sys/fs/cgroup/pids/sandpiper/s2/pids.max", encoding: .utf8) == "100"
            )
            setup.remove(sandboxID: "s2")
            #expect(setup.leftoverSandboxIDs().isEmpty)
        }
    }
}
