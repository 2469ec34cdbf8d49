// A JavaScript agent of many modules (tests/test_js_guests.py): its own files in
// TypeScript and JavaScript, an import cycle, and two vendored packages under
// node_modules, one through package.json "exports", one through "main".
import { tool } from "torpor";
import { double, explode } from "./lib/math.js"; // lib/math.ts, as TypeScript authors write it
import { isEven } from "./lib/even";
import { pad } from "tiny-fmt";
import { shout } from "tiny-fmt/extra";
import { tag } from "@acme/util";

interface Input { mode?: string; n?: number }

export default async function main(input: Input) {
  if (input?.mode === "throw") return explode("from the agent");
  if (input?.mode === "dynamic") {
    const m = await import("./lib/math.js"); // bundled: imported statically above
    return { d: m.double(21) };
  }
  if (input?.mode === "unbundled") return await import("./lib/" + "nothere.js");
  const n: number = input?.n ?? 3;
  let total = 0;
  for (let i = 0; i < n; i++) {
    const { value } = await tool("kv.incr", { key: "multi", by: 1 });
    total += double(value);
  }
  return { total, even: isEven(total), padded: pad(String(total), 6), loud: shout("ok"), tag: tag() };
}
