'use strict';
/*
 * Sandpiper Node.js guest agent.
 *
 * Runs inside a sandbox and executes JavaScript statefully on behalf of the
 * host, like the Azure Container Apps NodeLTS session pool (IJavascript).
 * Requests arrive on fd 3, responses leave on fd 4; both use length-prefixed
 * JSON frames (4-byte big-endian length, then UTF-8 JSON). See
 * docs/agent-protocol.md for the wire protocol.
 *
 * The file runs as two processes:
 *
 *   supervisor  (`node agent.js`, started by the host) speaks the protocol on
 *               fd 3/4, captures the worker's fd 1/2 (so the output of child
 *               processes is captured too), enforces a hard deadline and
 *               restarts the worker when it dies or cannot be interrupted.
 *   worker      (`node --expose-internals agent.js --sandpiper-worker`) owns
 *               the persistent JavaScript context and runs the cells. It talks
 *               to the supervisor over a socket on its fd 3.
 *
 * Node.js built-in modules only.
 */

const fs = require('fs');
const path = require('path');
const util = require('util');

const PROTOCOL_VERSION = 1;
const MAX_REQUEST_FRAME = 64 * 1024 * 1024; // host -> agent
const MAX_RESPONSE_FRAME = 16 * 1024 * 1024; // agent -> host
const DEFAULT_OUTPUT_LIMIT = 1024 * 1024;
const WORKER_FLAG = '--sandpiper-worker';
const MAX_TIMER_MS = 0x7fffffff;

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

const sleepCell = new Int32Array(new SharedArrayBuffer(4));
function sleepMs(ms) {
  Atomics.wait(sleepCell, 0, 0, ms);
}

/** Write all of buf to fd synchronously. Returns false if the fd is unusable. */
function writeAllSync(fd, buf) {
  let off = 0;
  let spins = 0;
  while (off < buf.length) {
    try {
      off += fs.writeSync(fd, buf, off, buf.length - off);
      spins = 0;
    } catch (e) {
      if (e && e.code === 'EAGAIN') {
        sleepMs(spins < 10 ? 1 : 5);
        spins++;
        continue;
      }
      if (e && e.code === 'EINTR') continue;
      return false;
    }
  }
  return true;
}

function wellFormed(s) {
  if (typeof s !== 'string') return s;
  if (typeof s.toWellFormed === 'function') return s.toWellFormed();
  return s.replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, '\ufffd');
}

/** Cut UTF-8 bytes to at most `limit` bytes without splitting a character. */
function utf8Cut(buf, limit) {
  if (buf.length <= limit) return buf;
  let cut = limit;
  let back = 0;
  while (cut > 0 && back < 3 && (buf[cut] & 0xc0) === 0x80) {
    cut--;
    back++;
  }
  if (back === 3 && cut > 0 && (buf[cut] & 0xc0) === 0x80) cut = limit;
  return buf.subarray(0, cut);
}

/** [text, truncated] with the UTF-8 encoding of text at most limit bytes. */
function capText(text, limit) {
  if (text == null) return ['', false];
  text = wellFormed(String(text));
  if (text.length * 3 <= limit) return [text, false];
  const raw = Buffer.from(text, 'utf8');
  if (raw.length <= limit) return [text, false];
  return [utf8Cut(raw, limit).toString('utf8'), true];
}

/** Like capText but keeps the end of the text. */
function capTextTail(text, limit) {
  const raw = Buffer.from(text, 'utf8');
  if (raw.length <= limit) return [text, false];
  if (limit <= 0) return ['', true];
  let tail = raw.subarray(raw.length - limit);
  let i = 0;
  while (i < tail.length && i < 4 && (tail[i] & 0xc0) === 0x80) i++;
  return [tail.subarray(i).toString('utf8'), true];
}

/** Decode captured bytes (invalid UTF-8 -> U+FFFD) and cap to limit bytes. */
function decodeCapped(buf, limit) {
  const text = utf8Cut(buf, limit).toString('utf8');
  return capText(text, limit)[0];
}

function formatSeconds(t) {
  return String(t); // 1 -> "1", 0.5 -> "0.5"
}

function encodeFrame(obj) {
  const payload = Buffer.from(JSON.stringify(obj), 'utf8');
  const header = Buffer.allocUnsafe(4);
  header.writeUInt32BE(payload.length, 0);
  return Buffer.concat([header, payload]);
}

/** Incremental reader for length-prefixed frames; discards over-long ones. */
class FrameReader {
  constructor(maxFrame, onFrame, onTooLarge) {
    this.maxFrame = maxFrame;
    this.onFrame = onFrame;
    this.onTooLarge = onTooLarge;
    this.header = Buffer.alloc(4);
    this.headerLen = 0;
    this.need = -1;
    this.chunks = [];
    this.got = 0;
    this.discard = 0;
    this.discardSize = 0;
  }

  push(buf) {
    let off = 0;
    while (off < buf.length) {
      if (this.discard > 0) {
        const n = Math.min(this.discard, buf.length - off);
        this.discard -= n;
        off += n;
        if (this.discard === 0) this.onTooLarge(this.discardSize);
        continue;
      }
      if (this.need < 0) {
        const n = Math.min(4 - this.headerLen, buf.length - off);
        buf.copy(this.header, this.headerLen, off, off + n);
        this.headerLen += n;
        off += n;
        if (this.headerLen === 4) {
          this.headerLen = 0;
          const size = this.header.readUInt32BE(0);
          if (size > this.maxFrame) {
            this.discard = size;
            this.discardSize = size;
          } else if (size === 0) {
            this.onFrame(Buffer.alloc(0));
          } else {
            this.need = size;
            this.chunks = [];
            this.got = 0;
          }
        }
        continue;
      }
      const n = Math.min(this.need - this.got, buf.length - off);
      this.chunks.push(buf.subarray(off, off + n));
      this.got += n;
      off += n;
      if (this.got === this.need) {
        const frame = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.need);
        this.need = -1;
        this.chunks = [];
        this.got = 0;
        this.onFrame(frame);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Supervisor
// ---------------------------------------------------------------------------

function supervisor() {
  const net = require('net');
  const crypto = require('crypto');
  const { spawn } = require('child_process');

  const REQUEST_FD = 3;
  const RESPONSE_FD = 4;
  const KILL_CHILDREN_AFTER_MS = 1000; // after the timeout: SIGKILL the cell's processes
  const RESTART_AFTER_MS = 5000; // after the timeout: restart the worker (host grace is 10 s)
  const MARKER_WAIT_MS = 2000;

  function log(msg) {
    try {
      fs.writeSync(2, `sandpiper-agent: ${msg}\n`);
    } catch (e) {
      // nothing we can do
    }
  }

  // Node opens its own descriptors (epoll, eventfd, pipes) at the lowest free
  // numbers before any JavaScript runs, so "fd 3 is open" proves nothing: the
  // protocol fds must be pipes, sockets, files or character devices, and the
  // epoll instance Node creates first would land on a missing fd 3 or fd 4.
  for (const fd of [REQUEST_FD, RESPONSE_FD]) {
    let usable = false;
    try {
      const st = fs.fstatSync(fd);
      usable = st.isFIFO() || st.isSocket() || st.isFile() || st.isCharacterDevice();
    } catch (e) {
      usable = false;
    }
    if (!usable) {
      log('fd 3 (requests) and fd 4 (responses) must be open');
      process.exit(2);
    }
  }

  process.on('SIGINT', () => {});
  process.on('uncaughtException', (err) => log(`internal error: ${(err && err.stack) || err}`));
  process.on('unhandledRejection', (err) => log(`internal error: ${(err && err.stack) || err}`));

  // -- protocol output --------------------------------------------------------

  function shutdown() {
    if (worker && worker.child && worker.child.exitCode === null) {
      // The session is over: end the worker and whatever it started.
      let pids = [];
      try {
        pids = descendants(worker.child.pid);
      } catch (e) {
        // best effort
      }
      for (const pid of pids) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch (e) {
          // gone
        }
      }
      try {
        worker.child.kill('SIGKILL');
      } catch (e) {
        // already gone
      }
    }
    process.reallyExit ? process.reallyExit(0) : process.exit(0);
  }

  function send(obj) {
    let frame;
    try {
      frame = encodeFrame(obj);
    } catch (e) {
      frame = encodeFrame({ id: obj.id ?? null, type: 'error', message: `internal error: ${e}` });
    }
    if (!writeAllSync(RESPONSE_FD, frame)) shutdown();
  }

  // -- output capture of the worker's fd 1/2 ----------------------------------

  function partialSuffix(data, marker) {
    // Length of the longest suffix of data that is a proper prefix of marker.
    const max = Math.min(data.length, marker.length - 1);
    for (let k = max; k > 0; k--) {
      if (data[data.length - k] !== marker[0]) continue;
      if (data.subarray(data.length - k).equals(marker.subarray(0, k))) return k;
    }
    return 0;
  }

  class Capture {
    constructor(name) {
      this.name = name;
      this.mode = 'idle'; // idle | start | capture
      this.carry = null;
      this.reset(0);
    }

    reset(limit) {
      this.limit = limit;
      this.keep = limit + 4;
      this.chunks = [];
      this.kept = 0;
      this.total = 0;
      this.ended = false;
      this.onEnd = null;
    }

    arm(nonce, limit) {
      this.reset(limit);
      this.startMarker = Buffer.from(`\u0000\u001bsandpiper:${nonce}:start\u001b\u0000`);
      this.endMarker = Buffer.from(`\u0000\u001bsandpiper:${nonce}:end\u001b\u0000`);
      this.mode = 'start';
      this.carry = null;
    }

    commit(data) {
      if (!data.length) return;
      this.total += data.length;
      if (this.kept < this.keep) {
        const take = data.length > this.keep - this.kept ? data.subarray(0, this.keep - this.kept) : data;
        this.chunks.push(Buffer.from(take));
        this.kept += take.length;
      }
    }

    push(chunk) {
      if (this.mode === 'idle') return; // output between cells is dropped
      let data = this.carry ? Buffer.concat([this.carry, chunk]) : chunk;
      this.carry = null;
      while (data.length && this.mode !== 'idle') {
        const marker = this.mode === 'start' ? this.startMarker : this.endMarker;
        const idx = data.indexOf(marker);
        if (idx >= 0) {
          if (this.mode === 'capture') this.commit(data.subarray(0, idx));
          data = data.subarray(idx + marker.length);
          if (this.mode === 'start') {
            this.mode = 'capture';
          } else {
            this.finishCapture();
          }
          continue;
        }
        const hold = partialSuffix(data, marker);
        if (this.mode === 'capture') this.commit(data.subarray(0, data.length - hold));
        if (hold) this.carry = Buffer.from(data.subarray(data.length - hold));
        break;
      }
    }

    finishCapture() {
      if (this.mode === 'capture' && this.carry) this.commit(this.carry);
      this.carry = null;
      this.mode = 'idle';
      this.ended = true;
      const cb = this.onEnd;
      this.onEnd = null;
      if (cb) cb();
    }

    /** Stop capturing (if still running) and return [text, truncated]. */
    collect() {
      if (this.mode !== 'idle') this.finishCapture();
      const buf = Buffer.concat(this.chunks, this.kept);
      const text = decodeCapped(buf, this.limit);
      const truncated = this.total > this.limit;
      this.chunks = [];
      this.kept = 0;
      return [text, truncated];
    }
  }

  const outCapture = new Capture('stdout');
  const errCapture = new Capture('stderr');

  // -- process tree helpers ---------------------------------------------------

  function descendants(pid) {
    const found = new Set();
    let parents = null;
    const useChildren = fs.existsSync(`/proc/${pid}/task/${pid}/children`);
    if (!useChildren) {
      parents = new Map();
      let entries = [];
      try {
        entries = fs.readdirSync('/proc');
      } catch (e) {
        return found;
      }
      for (const entry of entries) {
        if (!/^\d+$/.test(entry)) continue;
        try {
          const stat = fs.readFileSync(`/proc/${entry}/stat`, 'latin1');
          const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
          if (!parents.has(ppid)) parents.set(ppid, []);
          parents.get(ppid).push(Number(entry));
        } catch (e) {
          // raced with exit
        }
      }
    }
    const stack = [pid];
    while (stack.length) {
      const p = stack.pop();
      let kids = [];
      if (useChildren) {
        let tids = [];
        try {
          tids = fs.readdirSync(`/proc/${p}/task`);
        } catch (e) {
          continue;
        }
        for (const tid of tids) {
          try {
            const text = fs.readFileSync(`/proc/${p}/task/${tid}/children`, 'latin1');
            for (const k of text.split(/\s+/)) if (k) kids.push(Number(k));
          } catch (e) {
            // raced with exit
          }
        }
      } else {
        kids = parents.get(p) || [];
      }
      for (const k of kids) {
        if (!found.has(k)) {
          found.add(k);
          stack.push(k);
        }
      }
    }
    return found;
  }

  function killNewDescendants(pid, before) {
    let now;
    try {
      now = descendants(pid);
    } catch (e) {
      return;
    }
    for (const p of now) {
      if (before && before.has(p)) continue;
      try {
        process.kill(p, 'SIGKILL');
      } catch (e) {
        // gone
      }
    }
  }

  // -- the worker process -----------------------------------------------------

  let worker = null; // { child, sock, ready: Promise, pending: fn|null, exited, exitInfo }
  let workerNote = ''; // told to the next cell (e.g. the worker died between cells)
  let startFailures = 0;

  function workerEnv() {
    const env = Object.assign({}, process.env);
    const globalDirs = ['/usr/local/lib/node_modules', '/usr/lib/node_modules', '/usr/share/nodejs']
      .filter((d) => {
        try {
          return fs.statSync(d).isDirectory();
        } catch (e) {
          return false;
        }
      });
    const existing = (env.NODE_PATH || '').split(path.delimiter).filter(Boolean);
    for (const d of globalDirs) if (!existing.includes(d)) existing.push(d);
    if (existing.length) env.NODE_PATH = existing.join(path.delimiter);
    return env;
  }

  function startWorker() {
    const child = spawn(process.execPath, ['--expose-internals', __filename, WORKER_FLAG], {
      cwd: process.cwd(),
      env: workerEnv(),
      stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
    });
    const w = { child, sock: child.stdio[3], pending: null, exited: false, exitInfo: '', isReady: false };
    let readyResolve;
    let readyReject;
    w.ready = new Promise((resolve, reject) => {
      readyResolve = resolve;
      readyReject = reject;
    });
    w.ready.catch(() => {});
    child.stdout.on('data', (d) => {
      if (worker === w) outCapture.push(d);
    });
    child.stderr.on('data', (d) => {
      if (worker === w) errCapture.push(d);
      else if (!w.isReady) log(`worker: ${d.toString('utf8').trimEnd()}`);
    });
    child.stdout.on('error', () => {});
    child.stderr.on('error', () => {});
    w.sock.on('error', () => {});
    const reader = new FrameReader(Number.MAX_SAFE_INTEGER, (frame) => {
      let msg;
      try {
        msg = JSON.parse(frame.toString('utf8'));
      } catch (e) {
        log(`bad frame from worker: ${e}`);
        return;
      }
      if (msg.type === 'ready') {
        w.isReady = true;
        w.version = msg.version;
        readyResolve(msg);
        return;
      }
      const cb = w.pending;
      w.pending = null;
      if (cb) cb(msg);
    }, () => {});
    w.sock.on('data', (d) => reader.push(d));
    child.on('error', (e) => {
      log(`cannot start the worker: ${e}`);
    });
    child.on('exit', (code, signal) => {
      w.exited = true;
      w.exitInfo = signal ? `signal ${signal}` : `exit code ${code}`;
      if (!w.isReady) readyReject(new Error(`the JavaScript runtime failed to start (${w.exitInfo})`));
      const cb = w.pending;
      w.pending = null;
      if (cb) {
        cb(null);
      } else if (worker === w && w.isReady && !w.killedOnPurpose) {
        log(`the JavaScript runtime exited between executions (${w.exitInfo}); restarting it`);
        workerNote = `sandpiper-agent: the JavaScript runtime exited between executions (${w.exitInfo}); ` +
          'a new one was started and all variables were lost.\n';
        worker = startWorker();
      }
    });
    return w;
  }

  function killWorker(w) {
    w.killedOnPurpose = true;
    try {
      w.child.kill('SIGKILL');
    } catch (e) {
      // gone
    }
  }

  async function ensureWorker() {
    for (;;) {
      if (!worker || worker.exited) worker = startWorker();
      try {
        await worker.ready;
        startFailures = 0;
        return worker;
      } catch (e) {
        startFailures++;
        log(String(e.message || e));
        if (startFailures >= 3) throw e;
        worker = null;
      }
    }
  }

  // -- requests ---------------------------------------------------------------

  class RequestError extends Error {}

  function parseExecute(req) {
    if (typeof req.code !== 'string') throw new RequestError("execute: 'code' must be a string");
    let timeout = req.timeoutSeconds;
    if (timeout !== undefined && timeout !== null) {
      if (typeof timeout !== 'number') throw new RequestError("execute: 'timeoutSeconds' must be a number");
      if (!Number.isFinite(timeout) || timeout <= 0 || timeout * 1000 > 0xfffffffe) timeout = null;
    } else {
      timeout = null;
    }
    let limit = req.outputLimit;
    if (limit === undefined || limit === null) limit = DEFAULT_OUTPUT_LIMIT;
    if (typeof limit !== 'number') throw new RequestError("execute: 'outputLimit' must be a number");
    if (Number.isNaN(limit)) limit = DEFAULT_OUTPUT_LIMIT;
    limit = Math.floor(Math.max(0, Math.min(limit, MAX_RESPONSE_FRAME)));
    return { code: req.code, timeout, limit };
  }

  function fitResultFrame(reply) {
    const budget = MAX_RESPONSE_FRAME - 64;
    for (let i = 0; i < 64; i++) {
      const size = Buffer.byteLength(JSON.stringify(reply), 'utf8');
      if (size <= budget) return reply;
      const over = size - budget;
      let key = null;
      let best = -1;
      for (const k of ['stdout', 'stderr', 'jupyterResult', 'result']) {
        const v = reply[k];
        if (typeof v === 'string') {
          const n = Buffer.byteLength(JSON.stringify(v), 'utf8');
          if (n > best) {
            best = n;
            key = k;
          }
        }
      }
      if (key === null) return reply;
      const raw = Buffer.from(reply[key], 'utf8');
      const ratio = Math.max(1, best / Math.max(1, raw.length));
      const keep = Math.max(0, raw.length - Math.floor(over / ratio) - 1024);
      reply[key] = utf8Cut(raw, keep).toString('utf8');
      if (key === 'stdout') reply.stdoutTruncated = true;
      if (key === 'stderr') reply.stderrTruncated = true;
    }
    return reply;
  }

  function buildResult(rid, limit, parts) {
    // parts: { ok, result, jupyterResult, timedOut, tail, durationMs }
    const [stdout, stdoutTrunc] = outCapture.collect();
    let [stderr, stderrTrunc] = errCapture.collect();
    let tail = parts.tail || '';
    if (tail) {
      let tailCut;
      [tail, tailCut] = capTextTail(tail, limit);
      const room = limit - Buffer.byteLength(tail, 'utf8');
      let cut = false;
      if (stderr && !stderr.endsWith('\n')) {
        [stderr, cut] = capText(stderr, Math.max(0, room - 1));
        if (stderr) stderr += '\n';
      } else {
        [stderr, cut] = capText(stderr, Math.max(0, room));
      }
      stderr += tail;
      stderrTrunc = stderrTrunc || cut || tailCut;
    }
    const ok = !!parts.ok;
    return fitResultFrame({
      id: rid,
      type: 'result',
      status: ok ? 'Success' : 'Failure',
      stdout,
      stderr,
      result: ok ? parts.result : '',
      jupyterResult: ok ? parts.jupyterResult : '',
      timedOut: !!parts.timedOut,
      durationMs: parts.durationMs,
      stdoutTruncated: !!stdoutTrunc,
      stderrTruncated: !!stderrTrunc,
    });
  }

  async function execute(rid, req) {
    const { code, timeout, limit } = parseExecute(req);
    const start = performance.now();
    let w;
    try {
      w = await ensureWorker();
    } catch (e) {
      outCapture.reset(limit);
      errCapture.reset(limit);
      return buildResult(rid, limit, {
        ok: false,
        tail: `sandpiper-agent: ${e.message || e}\n`,
        durationMs: performance.now() - start,
      });
    }
    const note = workerNote;
    workerNote = '';
    const nonce = crypto.randomBytes(12).toString('hex');
    outCapture.arm(nonce, limit);
    errCapture.arm(nonce, limit);
    let before = null;
    if (timeout !== null) {
      try {
        before = descendants(w.child.pid);
      } catch (e) {
        before = null;
      }
    }

    const reply = await new Promise((resolve) => {
      const timers = [];
      let done = false;
      const finish = (msg, hardTimeout) => {
        if (done) return;
        done = true;
        for (const t of timers) clearTimeout(t);
        resolve({ msg, hardTimeout });
      };
      w.pending = (msg) => finish(msg, false);
      if (w.exited) {
        // It died after ensureWorker() returned: nothing will answer.
        w.pending = null;
        finish(null, false);
        return;
      }
      if (timeout !== null) {
        const ms = timeout * 1000;
        const killKids = () => {
          if (done) return;
          killNewDescendants(w.child.pid, before);
          timers.push(setTimeout(killKids, 1000));
        };
        timers.push(setTimeout(killKids, Math.min(MAX_TIMER_MS, ms + KILL_CHILDREN_AFTER_MS)));
        timers.push(setTimeout(() => {
          if (done) return;
          killNewDescendants(w.child.pid, before);
          w.pending = null;
          killWorker(w);
          finish(null, true);
        }, Math.min(MAX_TIMER_MS, ms + RESTART_AFTER_MS)));
      }
      const frame = encodeFrame({ type: 'execute', id: rid, code, timeoutSeconds: timeout, nonce, limit });
      w.sock.write(frame);
    });

    let { msg } = reply;
    if (msg) {
      // Wait until the end markers of both streams have been read.
      const waits = [];
      for (const [cap, wrote] of [[outCapture, msg.markers && msg.markers.stdout], [errCapture, msg.markers && msg.markers.stderr]]) {
        if (wrote && !cap.ended) waits.push(new Promise((resolve) => { cap.onEnd = resolve; }));
      }
      if (waits.length) {
        let timer;
        await Promise.race([
          Promise.all(waits),
          new Promise((resolve) => { timer = setTimeout(resolve, MARKER_WAIT_MS); }),
        ]);
        clearTimeout(timer);
      }
      const parts = {
        ok: msg.ok,
        result: msg.result,
        jupyterResult: msg.jupyterResult,
        timedOut: msg.timedOut,
        tail: note + (msg.tail || ''),
        durationMs: typeof msg.durationMs === 'number' ? msg.durationMs : performance.now() - start,
      };
      return buildResult(rid, limit, parts);
    }

    // The worker died or had to be killed: give it a moment to flush fd 1/2.
    await new Promise((resolve) => setTimeout(resolve, 100));
    let tail = note;
    if (reply.hardTimeout) {
      tail += 'sandpiper-agent: the code could not be interrupted, so the JavaScript runtime was restarted; ' +
        'all variables were lost.\n';
      tail += `TimeoutError: execution exceeded ${formatSeconds(timeout)} seconds and was interrupted\n`;
    } else {
      tail += `sandpiper-agent: the JavaScript runtime exited during the execution (${w.exitInfo}); ` +
        'a new one was started and all variables were lost.\n';
    }
    const result = buildResult(rid, limit, {
      ok: false,
      timedOut: !!reply.hardTimeout,
      tail,
      durationMs: performance.now() - start,
    });
    if (worker === w) worker = startWorker();
    return result;
  }

  function listPackages() {
    const seen = new Map();
    const dirs = ['/usr/local/lib/node_modules', '/usr/lib/node_modules', '/usr/share/nodejs'];
    const addPackage = (dir) => {
      try {
        const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
        if (pkg && typeof pkg.name === 'string' && pkg.name && !seen.has(pkg.name)) {
          seen.set(pkg.name, { name: pkg.name, version: typeof pkg.version === 'string' ? pkg.version : '' });
        }
      } catch (e) {
        // not a package
      }
    };
    for (const base of dirs) {
      let entries = [];
      try {
        entries = fs.readdirSync(base);
      } catch (e) {
        continue;
      }
      for (const entry of entries) {
        if (entry.startsWith('.')) continue;
        const full = path.join(base, entry);
        if (entry.startsWith('@')) {
          let scoped = [];
          try {
            scoped = fs.readdirSync(full);
          } catch (e) {
            continue;
          }
          for (const s of scoped) addPackage(path.join(full, s));
        } else {
          addPackage(full);
        }
      }
    }
    return [...seen.values()].sort((a, b) => {
      const x = a.name.toLowerCase();
      const y = b.name.toLowerCase();
      return x < y ? -1 : x > y ? 1 : (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    });
  }

  async function handle(item) {
    if (item.tooLarge !== undefined) {
      return { id: null, type: 'error', message: `request frame too large: ${item.tooLarge} bytes (limit ${MAX_REQUEST_FRAME})` };
    }
    let request;
    try {
      request = JSON.parse(new util.TextDecoder('utf-8', { fatal: true }).decode(item.payload));
    } catch (e) {
      return { id: null, type: 'error', message: `malformed request: ${e.message || e}` };
    }
    if (request === null || typeof request !== 'object' || Array.isArray(request)) {
      return { id: null, type: 'error', message: 'request must be a JSON object' };
    }
    const rid = Number.isInteger(request.id) ? request.id : null;
    const kind = request.type;
    try {
      if (kind === 'execute') return await execute(rid, request);
      if (kind === 'ping') return { id: rid, type: 'pong' };
      if (kind === 'packages') {
        return {
          id: rid,
          type: 'packages',
          packages: listPackages(),
          runtime: { name: 'node', version: process.versions.node },
        };
      }
    } catch (e) {
      if (e instanceof RequestError) return { id: rid, type: 'error', message: e.message };
      log(`internal error: ${(e && e.stack) || e}`);
      return { id: rid, type: 'error', message: `internal error: ${e}` };
    }
    return { id: rid, type: 'error', message: `unknown request type: ${JSON.stringify(kind === undefined ? null : kind)}` };
  }

  const queue = [];
  let busy = false;
  let accepting = false;

  async function pump() {
    if (busy || !accepting) return;
    busy = true;
    try {
      while (queue.length) {
        const item = queue.shift();
        let reply;
        try {
          reply = await handle(item);
        } catch (e) {
          log(`internal error: ${(e && e.stack) || e}`);
          reply = { id: null, type: 'error', message: `internal error: ${e}` };
        }
        send(reply);
      }
    } finally {
      busy = false;
    }
  }

  const reader = new FrameReader(MAX_REQUEST_FRAME,
    (payload) => { queue.push({ payload }); pump(); },
    (size) => { queue.push({ tooLarge: size }); pump(); });

  function openRequests() {
    let stream;
    try {
      stream = new net.Socket({ fd: REQUEST_FD, readable: true, writable: false });
    } catch (e) {
      stream = fs.createReadStream(null, { fd: REQUEST_FD, autoClose: false, highWaterMark: 1 << 20 });
    }
    stream.on('data', (d) => reader.push(d));
    stream.on('end', shutdown);
    stream.on('close', shutdown);
    stream.on('error', shutdown);
  }

  (async () => {
    openRequests();
    try {
      await ensureWorker();
    } catch (e) {
      log(`cannot start the JavaScript runtime: ${e.message || e}`);
      process.exit(1);
    }
    send({ type: 'ready', protocol: PROTOCOL_VERSION, pid: process.pid, language: 'javascript', version: process.versions.node });
    accepting = true;
    pump();
  })();
}

// ---------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------

function worker() {
  const net = require('net');
  const vm = require('vm');
  const stream = require('stream');
  const Module = require('module');

  const AGENT_FILE = __filename;
  const CHANNEL_FD = 3;
  const MAX_PENDING_ERRORS = 20;

  // -- fd 1/2: synchronous writers so output order and cell boundaries are exact

  class SyncFdStream extends stream.Writable {
    constructor(fd) {
      super({ decodeStrings: false });
      this.fd = fd;
      this.isTTY = false;
      this._type = 'fs';
    }

    write(chunk, encoding, cb) {
      if (typeof encoding === 'function') {
        cb = encoding;
        encoding = undefined;
      }
      let buf;
      if (typeof chunk === 'string') buf = Buffer.from(chunk, encoding || 'utf8');
      else if (chunk instanceof Uint8Array) buf = chunk;
      else if (chunk == null) throw new TypeError('The "chunk" argument must be of type string or an instance of Buffer or Uint8Array');
      else buf = Buffer.from(String(chunk), 'utf8');
      if (buf.length) writeAllSync(this.fd, buf);
      if (typeof cb === 'function') process.nextTick(cb);
      return true;
    }

    _write(chunk, encoding, cb) {
      writeAllSync(this.fd, typeof chunk === 'string' ? Buffer.from(chunk, encoding) : chunk);
      cb();
    }

    end(chunk, encoding, cb) {
      if (typeof chunk === 'function') {
        cb = chunk;
        chunk = undefined;
      }
      if (chunk != null) this.write(chunk, encoding);
      if (typeof cb === 'function') process.nextTick(cb);
      return this; // stdout/stderr are never closed
    }

    destroy() {
      return this;
    }
  }

  const stdoutStream = new SyncFdStream(1);
  const stderrStream = new SyncFdStream(2);
  Object.defineProperty(process, 'stdout', { configurable: true, enumerable: true, get: () => stdoutStream });
  Object.defineProperty(process, 'stderr', { configurable: true, enumerable: true, get: () => stderrStream });
  try {
    console._stdout = stdoutStream;
    console._stderr = stderrStream;
  } catch (e) {
    // older Node: the getters pick up process.stdout lazily anyway
  }

  // -- top-level await support (Node's own REPL transform) ---------------------

  let processTopLevelAwait = null;
  try {
    ({ processTopLevelAwait } = require('internal/repl/await'));
  } catch (e) {
    processTopLevelAwait = null;
  }

  // -- globals for user code ----------------------------------------------------

  const cwd = process.cwd();
  const replFile = path.join(cwd, '<repl>');
  const userModule = new Module(replFile, null);
  userModule.filename = replFile;
  userModule.paths = Module._nodeModulePaths(cwd).concat(Module.globalPaths || []);
  const userRequire = Module.createRequire(replFile);
  for (const [name, value] of [
    ['require', userRequire],
    ['module', userModule],
    ['exports', userModule.exports],
    ['__filename', replFile],
    ['__dirname', cwd],
  ]) {
    Object.defineProperty(globalThis, name, { configurable: true, writable: true, enumerable: false, value });
  }

  class ProcessExitCalled extends Error {
    constructor(code) {
      super(`process.exit(${code === undefined ? '' : util.inspect(code)}) was called`);
      this.name = 'ProcessExit';
      this.exitCode = code;
    }
  }
  process.exit = function exit(code) {
    throw new ProcessExitCalled(code);
  };
  process.on('SIGINT', () => {});

  // -- error formatting ---------------------------------------------------------

  function isInternalFrame(line) {
    return line.includes(AGENT_FILE) || /\((node:|internal\/)/.test(line) || /^\s*at (async )?node:/.test(line);
  }

  function cleanStack(stack) {
    const lines = stack.split('\n');
    let cut = lines.length;
    for (let i = 0; i < lines.length; i++) {
      const l = lines[i];
      if (/^\s+at /.test(l) && (l.includes(AGENT_FILE) || l.includes('node:vm:'))) {
        cut = i;
        break;
      }
    }
    let end = cut;
    while (end > 0 && /^\s+at /.test(lines[end - 1]) && isInternalFrame(lines[end - 1])) {
      // drop trailing internal frames (e.g. processTicksAndRejections), keep at least the message
      end--;
    }
    return lines.slice(0, end).join('\n');
  }

  function formatError(err) {
    if (err instanceof ProcessExitCalled) {
      return `${err.message}\nNote: process.exit() was intercepted; the session keeps running and its state is kept.`;
    }
    try {
      if (err !== null && typeof err === 'object' && typeof err.stack === 'string' && err.stack) {
        let text = cleanStack(err.stack);
        // Errors with extra own properties (e.g. code, errno): show them like Node does.
        const extra = Object.keys(err).filter((k) => k !== 'stack' && k !== 'message');
        if (extra.length) {
          const props = {};
          for (const k of extra) props[k] = err[k];
          text += ' ' + util.inspect(props);
        }
        return text;
      }
      return `Uncaught ${util.inspect(err)}`;
    } catch (e) {
      return `Uncaught exception (could not be formatted: ${e})`;
    }
  }

  // -- errors that happen outside a cell -----------------------------------------

  let cellRunning = false;
  const pendingErrors = [];
  let droppedErrors = 0;

  function reportAsyncError(err, kind) {
    const text = `Uncaught ${kind === 'unhandledRejection' ? '(in promise) ' : ''}${formatError(err)}\n`;
    if (cellRunning) {
      writeAllSync(2, Buffer.from(text));
    } else if (pendingErrors.length < MAX_PENDING_ERRORS) {
      pendingErrors.push(capText(text, 64 * 1024)[0]);
    } else {
      droppedErrors++;
    }
  }
  process.on('uncaughtException', (err) => reportAsyncError(err, 'uncaughtException'));
  process.on('unhandledRejection', (reason) => reportAsyncError(reason, 'unhandledRejection'));

  // -- evaluation -------------------------------------------------------------------

  let cellCount = 0;
  const importOption = vm.constants && vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER;

  function compile(source, filename) {
    const options = { filename };
    if (importOption) options.importModuleDynamically = importOption;
    return new vm.Script(source, options);
  }

  function isObjectLiteral(code) {
    return /^\s*\{/.test(code) && /\}\s*$/.test(code);
  }

  // Static `import` statements are not valid in a script. When a cell fails
  // with that error, its simple import forms are rewritten to dynamic
  // import() calls (then handled like any top-level await):
  //   import x from 'm'            -> var { default: x } = await import('m');
  //   import * as ns from 'm'      -> var ns = await import('m');
  //   import { a, b as c } from 'm' -> var { a, b: c } = await import('m');
  //   import x, { a } from 'm'     -> var { default: x, a } = await import('m');
  //   import 'm'                   -> await import('m');
  // `var` keeps re-running the same cell possible.
  const IMPORT_RE = new RegExp(
    String.raw`^([ \t]*)import[ \t]+(?:([A-Za-z_$][\w$]*)[ \t]*(?:,[ \t]*)?)?` +
    String.raw`(?:\*[ \t]*as[ \t]+([A-Za-z_$][\w$]*)[ \t]*|\{([^}]*)\}[ \t]*)?` +
    String.raw`(?:from[ \t]*)?(['"])([^'"\n]+)\5[ \t]*(?:with[ \t]*\{[^}]*\}[ \t]*)?;?`, 'gm');

  function rewriteImports(code) {
    let changed = false;
    const out = code.replace(IMPORT_RE, (match, indent, def, ns, named, quote, spec) => {
      if (def === undefined && ns === undefined && named === undefined && /\bfrom\b/.test(match)) return match;
      if ((def !== undefined || ns !== undefined || named !== undefined) && !/\bfrom\b/.test(match)) return match;
      if (def !== undefined && ns !== undefined) return match;
      changed = true;
      const target = `await import(${JSON.stringify(spec)})`;
      if (ns !== undefined) return `${indent}var ${ns} = ${target};`;
      const parts = [];
      if (def !== undefined) parts.push(`default: ${def}`);
      if (named !== undefined) {
        for (const item of named.split(',')) {
          const t = item.trim();
          if (!t) continue;
          const m = /^([\w$]+|"[^"]*"|'[^']*')\s+as\s+([\w$]+)$/.exec(t);
          parts.push(m ? `${m[1]}: ${m[2]}` : t);
        }
      }
      if (!parts.length) return `${indent}${target};`;
      return `${indent}var { ${parts.join(', ')} } = ${target};`;
    });
    return changed ? out : null;
  }

  function raceDeadline(promise, deadline) {
    return new Promise((resolve) => {
      let timer = null;
      if (deadline !== null) {
        const wait = Math.min(MAX_TIMER_MS, Math.max(0, deadline - Date.now()));
        timer = setTimeout(() => resolve({ timedOut: true }), wait);
      }
      Promise.resolve(promise).then(
        (value) => { if (timer) clearTimeout(timer); resolve({ value }); },
        (error) => { if (timer) clearTimeout(timer); resolve({ error, threw: true }); },
      );
    });
  }

  function isThenable(v) {
    return v !== null && (typeof v === 'object' || typeof v === 'function') && typeof v.then === 'function';
  }

  async function evaluate(code, deadline) {
    const filename = `<cell-${++cellCount}>`;
    if (/\bimport\b/.test(code)) {
      try {
        compile(code, filename);
      } catch (e) {
        if (e instanceof SyntaxError && /Cannot use import statement/.test(e.message)) {
          const rewritten = rewriteImports(code);
          if (rewritten !== null) code = rewritten;
        }
      }
    }
    let source = code;
    let wrapped = false;
    let isAsync = false;
    if (isObjectLiteral(code)) {
      const candidate = `(${code.trim()})\n`;
      try {
        compile(candidate, filename);
        source = candidate;
        wrapped = true;
      } catch (e) {
        // a block, not an object literal
      }
    }
    if (code.includes('await')) {
      if (processTopLevelAwait) {
        try {
          const transformed = processTopLevelAwait(source);
          if (transformed !== null) {
            source = transformed;
            isAsync = true;
          }
        } catch (e) {
          // a syntax error: compiling the original source reports it
        }
      }
    }
    let script;
    try {
      script = compile(source, filename);
    } catch (e) {
      if (!(wrapped || isAsync)) return { error: e };
      try {
        script = compile(code, filename);
        isAsync = false;
      } catch (e2) {
        if (!processTopLevelAwait && e2 instanceof SyntaxError && /await is only valid/.test(e2.message)) {
          // Fallback without Node's transform: declarations stay local to the cell.
          try {
            script = compile(`(async () => {\n${code}\n})()`, filename);
          } catch (e3) {
            return { error: e2 };
          }
        } else {
          return { error: e2 };
        }
      }
    }
    const options = { displayErrors: false, breakOnSigint: false };
    if (deadline !== null) {
      const left = Math.max(1, Math.min(0xfffffffe, Math.ceil(deadline - Date.now())));
      options.timeout = left;
    }
    let value;
    try {
      value = script.runInThisContext(options);
    } catch (e) {
      if (e && e.code === 'ERR_SCRIPT_EXECUTION_TIMEOUT' && deadline !== null && Date.now() >= deadline - 50) {
        return { timedOut: true };
      }
      return { error: e };
    }
    if (isAsync) {
      const r = await raceDeadline(value, deadline);
      if (r.timedOut || r.threw) return r;
      value = r.value ? r.value.value : undefined;
    }
    if (isThenable(value)) {
      const r = await raceDeadline(value, deadline);
      if (r.timedOut || r.threw) return r;
      value = r.value;
    }
    return { value };
  }

  function convertResult(value, limit) {
    if (value === undefined) return ['', ''];
    let text;
    try {
      text = util.inspect(value);
    } catch (e) {
      text = `<inspect failed: ${e}>`;
    }
    const jupyter = capText(text, limit)[0];
    if (value === null) return ['', jupyter];
    switch (typeof value) {
      case 'number':
        return [Number.isFinite(value) ? value : null, jupyter];
      case 'boolean':
        return [value, jupyter];
      case 'string':
        return [capText(value, limit)[0], jupyter];
      case 'bigint':
        return [capText(value.toString(), limit)[0], jupyter];
      default:
        return [jupyter, jupyter];
    }
  }

  async function runCell(req) {
    const limit = typeof req.limit === 'number' ? req.limit : DEFAULT_OUTPUT_LIMIT;
    const timeout = typeof req.timeoutSeconds === 'number' ? req.timeoutSeconds : null;
    const startMarker = Buffer.from(`\u0000\u001bsandpiper:${req.nonce}:start\u001b\u0000`);
    const endMarker = Buffer.from(`\u0000\u001bsandpiper:${req.nonce}:end\u001b\u0000`);
    const markers = { stdout: writeAllSync(1, startMarker), stderr: writeAllSync(2, startMarker) };
    if (pendingErrors.length || droppedErrors) {
      let text = 'Errors raised by callbacks after the previous execution finished:\n' + pendingErrors.join('');
      if (droppedErrors) text += `(${droppedErrors} more errors were dropped)\n`;
      pendingErrors.length = 0;
      droppedErrors = 0;
      writeAllSync(2, Buffer.from(text));
    }
    const t0 = performance.now();
    const deadline = timeout !== null ? Date.now() + timeout * 1000 : null;
    cellRunning = true;
    let outcome;
    try {
      outcome = await evaluate(req.code, deadline);
    } catch (e) {
      outcome = { error: e };
    }
    let ok = false;
    let result = '';
    let jupyterResult = '';
    let tail = '';
    let timedOut = false;
    if (outcome.timedOut) {
      timedOut = true;
    } else if ('error' in outcome) {
      tail = formatError(outcome.error) + '\n';
    } else {
      try {
        [result, jupyterResult] = convertResult(outcome.value, limit);
        ok = true;
      } catch (e) {
        tail = `sandpiper-agent: could not convert the result: ${e}\n`;
      }
    }
    if (deadline !== null && !timedOut && Date.now() > deadline) {
      // The cell only came back after its deadline (e.g. a blocking call that
      // had to be killed): report it as timed out.
      timedOut = true;
      ok = false;
    }
    if (timedOut) tail += `TimeoutError: execution exceeded ${formatSeconds(timeout)} seconds and was interrupted\n`;
    cellRunning = false;
    const durationMs = performance.now() - t0;
    if (markers.stdout) markers.stdout = writeAllSync(1, endMarker);
    if (markers.stderr) markers.stderr = writeAllSync(2, endMarker);
    return {
      id: req.id,
      type: 'result',
      ok,
      result: typeof result === 'string' ? wellFormed(result) : result,
      jupyterResult: wellFormed(jupyterResult),
      timedOut,
      tail: wellFormed(tail),
      durationMs,
      markers,
    };
  }

  // -- channel to the supervisor ----------------------------------------------------

  let channel;
  try {
    channel = new net.Socket({ fd: CHANNEL_FD, readable: true, writable: true });
  } catch (e) {
    fs.writeSync(2, `sandpiper-agent worker: no channel on fd ${CHANNEL_FD}: ${e}\n`);
    process.reallyExit(2);
  }
  const exitNow = () => process.reallyExit(0);
  channel.on('end', exitNow);
  channel.on('close', exitNow);
  channel.on('error', exitNow);

  const queue = [];
  let busy = false;
  async function pump() {
    if (busy) return;
    busy = true;
    while (queue.length) {
      const req = queue.shift();
      let reply;
      try {
        reply = await runCell(req);
      } catch (e) {
        cellRunning = false;
        reply = { id: req.id, type: 'result', ok: false, result: '', jupyterResult: '', timedOut: false,
          tail: `sandpiper-agent: internal error: ${(e && e.stack) || e}\n`, durationMs: 0,
          markers: { stdout: false, stderr: false } };
      }
      channel.write(encodeFrame(reply));
    }
    busy = false;
  }
  const reader = new FrameReader(Number.MAX_SAFE_INTEGER, (frame) => {
    let req;
    try {
      req = JSON.parse(frame.toString('utf8'));
    } catch (e) {
      return;
    }
    if (req && req.type === 'execute') {
      queue.push(req);
      pump();
    }
  }, () => {});
  channel.on('data', (d) => reader.push(d));

  // Warm up (compile, inspect, the await transform and dynamic import() once;
  // the latter prints a one-time ExperimentalWarning that must not end up in
  // the first cell's stderr), then report ready.
  (async () => {
    try {
      util.inspect({ a: [1, 'b'] });
      if (processTopLevelAwait) processTopLevelAwait('await 0');
      await compile('import("path")', '<warm-up>').runInThisContext({ displayErrors: false });
    } catch (e) {
      // not fatal
    }
    setImmediate(() => channel.write(encodeFrame({ type: 'ready', version: process.versions.node })));
  })();
}

if (process.argv.includes(WORKER_FLAG)) worker();
else supervisor();
