// Part of tests/guests/js_multi: the other half of the cycle with even.js.
import { isEven } from "./even.js";

export function isOdd(n) {
  return n === 0 ? false : isEven(n - 1);
}
