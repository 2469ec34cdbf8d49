// The Torpor console's only script: a page showing a moving agent reloads itself every few
// seconds (data-refresh) until the agent stops. Nothing else needs JavaScript.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const el = document.querySelector("[data-refresh]");
  if (!el) return;
  const seconds = Math.max(1, Number(el.getAttribute("data-refresh")) || 2);
  setTimeout(() => { if (!document.querySelector("form.decide input:focus")) location.reload(); }, seconds * 1000);
});
