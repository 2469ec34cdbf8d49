// Part of tests/guests/js_multi: a TypeScript module of the agent.
import { helper } from "inner-helper"; // node_modules next to this file (lib/node_modules)

export function double(x: number): number {
  return helper(x) * 2;
}

export function explode(where: string): never {
  throw new Error("exploded " + where);
}
