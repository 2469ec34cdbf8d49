// Types of the `torpor` module a JavaScript agent imports (guest ABI v1 through QuickJS).
// Point your editor at this file, e.g. in tsconfig.json:
//   "compilerOptions": { "paths": { "torpor": ["<torpor>/guest_sdk/js/torpor.d.ts"] } }
declare module "torpor" {
  /** JSON as the host sends and accepts it. */
  export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

  /** A tool call the host answered with an error object (ABI.md section 5). */
  export class ToolError extends Error {
    /** "denied", "rate_limited", "invalid_args", "tool_failed", "timeout", "unavailable", ... */
    readonly code: string;
    /** Whether the same call may succeed later. */
    readonly retryable: boolean;
    /** The policy rule that decided, when one did (e.g. "tools", "tools.kv.incr.max_calls"). */
    readonly rule?: string;
    /** Details the tool attached (e.g. `available`). */
    readonly [detail: string]: unknown;
  }

  /** The agent's input (parsed JSON; null when there is none). */
  export function input<T = Json>(): T;
  /** Sets the agent's output; the last call wins. It must serialise to JSON (at most 1 MiB). */
  export function output(value: unknown): void;
  /** Calls a tool the policy grants. The agent may hibernate until the promise settles. */
  export function tool<R = Json>(name: string, args?: Record<string, unknown>): Promise<R>;
  /** Sleeps as a host-settled, durable timer (the `timer.sleep` tool, which the policy must grant). */
  export function sleep(ms: number): Promise<void>;

  interface Log {
    (...args: unknown[]): void;
    debug(...args: unknown[]): void;
    info(...args: unknown[]): void;
    warn(...args: unknown[]): void;
    error(...args: unknown[]): void;
  }
  /** The agent's log (kept with its record; `torpor inspect`). */
  export const log: Log;

  const torpor: { input: typeof input; output: typeof output; tool: typeof tool; sleep: typeof sleep;
                  log: Log; ToolError: typeof ToolError };
  export default torpor;
}
