// Part of tests/guests/js_multi: even and odd import each other (a legal ES module cycle).
import { isOdd } from "./odd.js";

export function isEven(n) {
  return n === 0 ? true : isOdd(n - 1);
}
