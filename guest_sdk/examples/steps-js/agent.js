// steps, in JavaScript: input {"n": N}. Calls kv.incr("counter") N times and keeps a
// running sum of the answers in ordinary JS variables, which must survive every
// hibernation at an await. With a fresh store and n = 50: {"sum": 1275, "last": 50}.
import { tool } from "torpor";

export default async function main(input) {
  const n = input?.n;
  if (!Number.isInteger(n) || n < 0) throw new TypeError('input needs a non-negative integer "n"');
  let sum = 0;
  let last = 0;
  for (let i = 0; i < n; i++) {
    ({ value: last } = await tool("kv.incr", { key: "counter", by: 1 })); // may hibernate here
    sum += last;
  }
  return { sum, last };
}
