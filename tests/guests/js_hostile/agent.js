// A JavaScript agent that misbehaves on request: input {"mode": "..."}. Each mode is one
// of the bad inputs of issue 25; tests/test_js_guests.py says what the host must answer.
import { tool, output, sleep, log } from "torpor";

function thrower() {
  throw new Error("boom from JS");
}

function recurse(n) {
  return recurse(n + 1) + 1;
}

const modes = {
  async throw() {
    await tool("kv.incr", { key: "before-throw" });
    thrower();
  },
  async loop() {
    for (;;) {}
  },
  async alloc() {
    const keep = [];
    for (;;) keep.push(new Uint8Array(1 << 20));
  },
  async huge() {
    return "y".repeat(2 ** 29).length;
  },
  async recurse() {
    return recurse(0);
  },
  async wide() {
    // Frames of 300 locals each: QuickJS keeps them on the C (shadow) stack in linear
    // memory, which runs out before the wasm stack does.
    const locals = Array.from({ length: 300 }, (_, i) => `a${i} = n + ${i}`).join(", ");
    globalThis.wide = new Function("n", `let ${locals}; return wide(n + 1) + a0 + a299;`);
    return globalThis.wide(0);
  },
  async eval() {
    // Strings evaluated inside the sandbox reach only what the agent itself can reach.
    const seen = {
      sum: eval("1 + 2"),
      fn: new Function("a", "b", "return a * b")(6, 7),
      native: typeof globalThis.__torpor_native,
      indirect: (0, eval)("typeof __torpor_native + typeof std + typeof os + typeof require + typeof process"),
      date: Date.now(),
    };
    try {
      await import("os");
      seen.import = "imported";
    } catch (e) {
      seen.import = String(e.message);
    }
    try {
      await eval('tool("kv.set", { key: "x", value: 1 })');
      seen.denied = null;
    } catch (e) {
      seen.denied = { name: e.name, code: e.code, rule: e.rule, retryable: e.retryable };
    }
    return seen;
  },
  async unsettled() {
    await new Promise(() => {});
  },
  async many({ count }) {
    const settled = await Promise.allSettled(Array.from({ length: count }, () => tool("kv.incr", { key: "many" })));
    const tally = {};
    for (const s of settled) {
      const k = s.status === "fulfilled" ? "ok" : s.reason.code ?? s.reason.name;
      tally[k] = (tally[k] ?? 0) + 1;
    }
    return tally;
  },
  async sleep({ ms }) {
    const before = await tool("clock.now");
    await sleep(ms); // the host's timer.sleep: the agent hibernates in this await
    const after = await tool("clock.now");
    return { elapsed: after.unix_ms - before.unix_ms };
  },
  async timeout() {
    const order = [];
    const cancelled = setTimeout(() => order.push("cancelled"), 10);
    clearTimeout(cancelled);
    await new Promise((resolve) => setTimeout((x) => { order.push(x); resolve(); }, 20, "fired"));
    return { order };
  },
  async random() {
    const first = await tool("kv.incr", { key: "r" });
    return { a: Math.random(), b: Math.random(), after: first.value };
  },
  // ---- red-team cases: each must end this agent with a typed error, never the host ----
  async finally_loop() {
    try {
      throw new Error("x");
    } finally {
      for (;;) {}
    }
  },
  async catch_loop() {
    try {
      throw new Error("x");
    } catch {
      for (;;) {}
    }
  },
  async bad_error() {
    // A thrown value whose every conversion throws.
    throw { get message() { throw new Error("m"); }, toString() { throw new Error("s"); },
            get stack() { throw new Error("st"); }, get name() { throw new Error("n"); } };
  },
  async null_proto() {
    throw Object.create(null);
  },
  async proxy_error() {
    throw new Proxy({}, { get() { throw new Error("trap"); }, getPrototypeOf() { throw new Error("proto"); } });
  },
  async looping_error() {
    throw { get message() { for (;;) {} }, toString() { for (;;) {} } };
  },
  async raw_output({ text, depth }) {
    // JSON.stringify is the agent's to replace: the host gets whatever text it returns.
    JSON.stringify = () => (depth ? "[".repeat(depth) + "]".repeat(depth) : text);
    output(0);
  },
  async raw_call({ text }) {
    JSON.stringify = () => text;
    return await tool("kv.incr", {});
  },
  async deep_output() {
    let v = [];
    for (let i = 0; i < 100000; i++) v = [v];
    return v;
  },
  async deep_args() {
    let v = [];
    for (let i = 0; i < 100000; i++) v = [v];
    return await tool("kv.incr", { key: "k", by: v });
  },
  async surrogate_key() {
    return await tool("kv.incr", { key: "\ud800" });
  },
  async surrogate_output() {
    return "\udfff";
  },
  async then_hijack() {
    // The agent replaces Promise.prototype.then: the SDK's own awaits go through it.
    const orig = Promise.prototype.then;
    Promise.prototype.then = function (a, b) { return orig.call(this, () => { throw 1; }, b); };
    return await tool("kv.incr", { key: "n" });
  },
  async huge_output() {
    return "x".repeat(2 << 20);
  },
  async log_flood() {
    for (;;) log.info("x".repeat(60000)); // the host works inside every call: the wall clock ends it
  },
};

export default async function main(input) {
  const mode = modes[input.mode];
  if (!mode) throw new TypeError(`unknown mode ${input.mode}`);
  const result = await mode(input);
  if (result !== undefined) output(result);
}
