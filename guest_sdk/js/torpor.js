// The `torpor` module of a JavaScript agent (guest ABI v1 through QuickJS).
//
// Compiled into every JS agent's pristine image at build time. Everything here runs
// inside the sandbox; the only ways out are the native functions the runtime glue
// (guest_sdk/js/runtime.c) hands over as `globalThis.__torpor_native`, which this
// module takes and removes before any agent code runs.
const native = globalThis.__torpor_native;
delete globalThis.__torpor_native;

/** A tool call the host answered with an error object (ABI.md section 5). */
export class ToolError extends Error {
  constructor(body) {
    super(typeof body?.message === "string" ? body.message : "tool call failed");
    this.name = "ToolError";
    for (const [k, v] of Object.entries(body ?? {})) {
      if (k !== "message") this[k] = v;
    }
    if (typeof this.code !== "string") this.code = "tool_failed";
    if (typeof this.retryable !== "boolean") this.retryable = false;
  }
}

let inputValue;
let inputRead = false;

/** The agent's input, parsed once (the host checked it is JSON before the agent started). */
export function input() {
  if (!inputRead) {
    const text = native.input();
    inputValue = text === "" ? null : JSON.parse(text);
    inputRead = true;
  }
  return inputValue;
}

/** Sets the agent's output (the last call wins); `v` must serialise to JSON. */
export function output(v) {
  const text = JSON.stringify(v);
  if (text === undefined) throw new TypeError("torpor.output: the value does not serialise to JSON");
  native.output(text);
}

function say(level, args) {
  native.log(level, args.map((a) => (typeof a === "string" ? a : safeString(a))).join(" "));
}

function safeString(a) {
  if (a instanceof Error) return a.stack ? `${a.name}: ${a.message}\n${a.stack}` : String(a);
  try {
    const s = JSON.stringify(a);
    return s === undefined ? String(a) : s;
  } catch {
    return String(a);
  }
}

/** The agent's log: `log.info("x", 1)`, `log.warn`, `log.error`, `log.debug`; `log(...)` is info. */
export const log = Object.assign((...args) => say(1, args), {
  debug: (...args) => say(0, args),
  info: (...args) => say(1, args),
  warn: (...args) => say(2, args),
  error: (...args) => say(3, args),
});

/**
 * Calls a tool granted by the agent's policy. Returns a promise the host settles; while
 * nothing else can run, the agent hibernates (its whole state is its linear memory).
 * Rejects with a ToolError (`err.code === "denied"`, `err.rule`, ...) when the call fails.
 */
export function tool(name, args = {}) {
  if (typeof name !== "string") return Promise.reject(new TypeError("torpor.tool: the name must be a string"));
  let text;
  try {
    text = JSON.stringify(args);
  } catch (e) {
    return Promise.reject(e);
  }
  if (text === undefined || args === null || typeof args !== "object" || Array.isArray(args)) {
    return Promise.reject(new TypeError("torpor.tool: the arguments must be a JSON object"));
  }
  let pending;
  try {
    pending = native.call(name, text);
  } catch (e) {
    return Promise.reject(e); // too many calls waiting at once: a rejection, like any failure
  }
  return pending.then(([code, body]) => {
    const value = body === "" ? null : JSON.parse(body);
    if (code < 0) throw new ToolError(value);
    return value;
  });
}

/**
 * Sleeps `ms` milliseconds as a host-settled timer (the `timer.sleep` tool, which the policy
 * must grant): the agent hibernates meanwhile, and a crash does not restart the wait.
 */
export function sleep(ms) {
  return tool("timer.sleep", { ms: Math.max(0, Math.floor(Number(ms) || 0)) }).then(() => undefined);
}

// setTimeout/clearTimeout over the host's timer (QuickJS has no timers of its own): each
// timeout is one `timer.sleep` call, so the policy must grant it; a cleared timeout still
// waits out its call (a host call cannot be withdrawn) but never runs its callback.
let nextTimer = 1;
const cleared = new Set();
globalThis.setTimeout = (fn, ms = 0, ...args) => {
  const id = nextTimer++;
  sleep(ms).then(() => {
    if (cleared.delete(id)) return;
    if (typeof fn === "function") fn(...args);
  });
  return id;
};
globalThis.clearTimeout = (id) => {
  if (typeof id === "number" && id > 0 && id < nextTimer) cleared.add(id);
};

// The runtime's start: wait for the module's top level, then call its default export
// with the input; a value it resolves to (other than undefined) becomes the output.
native.start = async (evaluated, namespace) => {
  await evaluated;
  if (typeof namespace.default === "function") {
    const result = await namespace.default(input());
    if (result !== undefined) output(result);
  }
};

export default { input, output, log, tool, sleep, ToolError };
