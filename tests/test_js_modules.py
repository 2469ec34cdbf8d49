"""JavaScript agents of many modules: their own files and vendored npm packages.

The multi-module agent ``tests/guests/js_multi`` is built by ``torpor build``'s own code
(QuickJS compiles and links every module at build, asking :mod:`host.sandbox.js_modules`
to resolve each import) and runs in real Wasmtime against a real LMDB store. The build
errors come from small agent directories written into ``tmp_path``; each is a real build
that fails, and the resolver's own rules are checked without wasm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EXAMPLES, GUESTS, BundleFactory
from conftest import run_agent as run

from host.errors import ToolchainError
from host.runtime import Host
from host.sandbox import abi, js_runtime, wasm_binary
from host.sandbox import bundle as bundle_mod
from host.sandbox.execution import Suspended
from host.sandbox.js_modules import ModuleGraph

POLICY = (EXAMPLES / "steps-js" / "policy.toml").read_text()


@pytest.fixture(scope="module")
def js_built() -> bytes:
    return js_runtime.runtime_module()


@pytest.fixture(scope="module")
def multi(js_built: bytes, bundles: BundleFactory) -> bundle_mod.Bundle:
    return bundles.load(GUESTS / "js_multi")


def agent(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "policy.toml").write_text(POLICY)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# ---- the multi-module agent ----------------------------------------------------------

def test_multi_module_agent_hibernates_across_its_modules(host: Host, multi: bundle_mod.Bundle) -> None:
    """TypeScript and JavaScript modules, a cycle, a package through "exports" (its ESM
    entry, not the CommonJS one), a subpath export, a scoped package through "main", a
    package found from a subdirectory: all compiled in, state kept over 4 hibernations."""
    res = run(host, multi, {"n": 4})
    assert res.status == "completed", res.error
    assert res.output == {"total": 20, "even": True, "padded": "000020", "loud": "0OK!", "tag": "acme"}
    assert res.suspensions == 4


def test_every_module_is_compiled_into_the_image(multi: bundle_mod.Bundle) -> None:
    for atom in (b"exploded ", b"the CommonJS build was loaded"):
        assert (atom in multi.module) == (atom == b"exploded ")


def test_js_checkpoints_use_the_finer_chunks(multi: bundle_mod.Bundle) -> None:
    """The JS builder asks for 512-byte delta chunks (abi.CHUNK_SECTION) and a capture uses them."""
    assert wasm_binary.custom_sections(multi.module)[abi.CHUNK_SECTION] == str(js_runtime.CHUNK_SIZE).encode()
    from bench.rig import make_engine, make_rig

    rig = make_rig(make_engine(None), multi)
    assert rig.loaded.chunk_size == js_runtime.CHUNK_SIZE == 512
    ex = rig.execution(b'{"n": 2}')
    out = ex.start()
    assert isinstance(out, Suspended)
    delta = ex.capture().memory
    assert delta.chunk_size == 512 and 0 < delta.changed_bytes < 64 * 1024
    ex.release()


def test_an_error_in_an_imported_module_names_its_file_and_line(host: Host, multi: bundle_mod.Bundle) -> None:
    res = run(host, multi, {"mode": "throw"})
    assert res.error is not None and res.error["code"] == "agent_error"
    assert "Error: exploded from the agent" in res.error["message"]
    assert "lib/math.ts:9:" in res.error["message"]  # the throw, in the TypeScript module
    assert "agent.ts:14:" in res.error["message"]  # and its caller


def test_dynamic_import_reaches_bundled_modules_only(host: Host, multi: bundle_mod.Bundle) -> None:
    ok = run(host, multi, {"mode": "dynamic"})
    assert ok.status == "completed" and ok.output == {"d": 42}, ok.error
    bad = run(host, multi, {"mode": "unbundled"})
    assert bad.error is not None and bad.error["code"] == "agent_error"
    assert "cannot import './lib/nothere.js' from agent.ts" in bad.error["message"]


def test_cycle_that_reads_an_uninitialised_binding_names_the_cycle(js_built: bytes, host: Host,
                                                                   tmp_path: Path) -> None:
    d = agent(tmp_path / "tdz", {
        "agent.js": 'import { b } from "./b.js";\nexport const a = 1;\nexport default async () => b;\n',
        "b.js": 'import { a } from "./agent.js";\nexport const b = a + 1;\n',
    })
    res = run(host, bundle_mod.load_bytes(bundle_mod.build_dir(d)), {})
    assert res.error is not None and res.error["code"] == "agent_error"
    assert "ReferenceError" in res.error["message"] and "b.js:2:" in res.error["message"]
    assert "agent.js -> b.js -> agent.js" in res.error["message"]


# ---- build errors ----------------------------------------------------------------------

@pytest.mark.parametrize(("files", "message"), [
    ({"agent.js": 'import { tool } from "torpor";\nimport { x } from "./missing.js";\nexport default () => x;\n'},
     r"agent\.js:2:19: cannot import './missing\.js': no such module"),
    ({"agent.js": 'import lp from "left-pad";\nexport default () => lp;\n'},
     r"agent\.js:1:16: cannot import 'left-pad': no package 'left-pad' under node_modules"),
    ({"agent.js": 'import { nope } from "./lib.js";\nexport default () => nope;\n',
      "lib.js": "export const yes = 1;\n"},
     r"do not link: agent\.js: SyntaxError: Could not find export 'nope' in module 'lib\.js'"),
    ({"agent.js": 'import "./lib.js";\nexport default () => 1;\n', "lib.js": "const = ;\n"},
     r"lib\.js:1:\d+: SyntaxError"),
    ({"agent.js": 'import c from "cj";\nexport default () => c;\n',
      "node_modules/cj/package.json": '{"type": "commonjs", "main": "index.js"}',
      "node_modules/cj/index.js": "module.exports = 1;\n"},
     r"node_modules/cj/index\.js is a CommonJS module"),
    ({"agent.js": 'import x from "../outside.js";\nexport default () => x;\n'},
     r"outside the agent's directory"),
    ({"agent.js": 'import x from "https://example.com/x.js";\nexport default () => x;\n'},
     r"nothing is fetched at build"),
    ({"agent.js": 'import d from "./data.json";\nexport default () => d;\n', "data.json": "{}"},
     r"agent\.js:1:15: cannot import '\./data\.json': data\.json is not a JavaScript or TypeScript module"),
    ({"agent.js": 'import x from "pkg/secret";\nexport default () => x;\n',
      "node_modules/pkg/package.json": '{"exports": {".": "./i.js"}}', "node_modules/pkg/i.js": "",
      "node_modules/pkg/secret.js": "export default 1;\n"},
     r"has no './secret'"),
    ({"agent.js": 'export * from "./a.js";\nexport * from "./b.js";\nimport { x } from "./agent.js";\n'
      'export default () => x;\n', "a.js": "export const x = 1;\n", "b.js": "export const x = 2;\n"},
     r"export 'x' in module 'agent\.js' is ambiguous"),
    ({"agent.js": 'import { x } from "./a.js";\nexport default () => x;\n', "a.js": 'export { x } from "./b.js";\n',
      "b.js": 'export { x } from "./a.js";\n'},
     r"circular reference when looking for export 'x' in module 'a\.js'"),
])
def test_unresolvable_imports_are_build_errors_naming_file_and_line(js_built: bytes, tmp_path: Path,
                                                                    files: dict[str, str], message: str) -> None:
    d = agent(tmp_path / "bad", files)
    with pytest.raises(ToolchainError, match=message):
        bundle_mod.build_dir(d)


# ---- the resolver's rules, without wasm ------------------------------------------------

def test_resolution_rules(tmp_path: Path) -> None:
    d = agent(tmp_path / "a", {
        "agent.ts": "", "lib/index.ts": "", "lib/x.mjs": "",
        "node_modules/p/package.json": json.dumps({"exports": {
            ".": [{"worker": "./w.js"}, {"import": {"torpor": "./t.js", "default": "./i.js"}}],
            "./features/*.js": "./src/features/*.js", "./features/internal/*": None}}),
        "node_modules/p/t.js": "", "node_modules/p/i.js": "", "node_modules/p/src/features/a/b.js": "",
        "node_modules/m/package.json": json.dumps({"module": "esm.js", "main": "cjs.js"}),
        "node_modules/m/esm.js": "", "node_modules/m/cjs.js": "",
        "node_modules/bare/index.js": "",
    })
    g = ModuleGraph.of_dir(d)
    assert g.entry == "agent.ts"
    assert g.resolve("agent.ts", "./lib") == "lib/index.ts"
    assert g.resolve("agent.ts", "./lib/x.mjs") == "lib/x.mjs"
    assert g.resolve("lib/index.ts", "../agent.js") == "agent.ts"
    assert g.resolve("agent.ts", "p") == "node_modules/p/t.js"  # the torpor condition, in an array fallback
    assert g.resolve("lib/index.ts", "p/features/a/b.js") == "node_modules/p/src/features/a/b.js"
    assert g.resolve("agent.ts", "m") == "node_modules/m/esm.js"
    assert g.resolve("agent.ts", "bare") == "node_modules/bare/index.js"
    assert g.resolve("agent.ts", "torpor") == "torpor"
    with pytest.raises(ToolchainError, match=r"has no '\./features/internal/x'"):
        g.resolve("agent.ts", "p/features/internal/x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "package.json").write_text('{"main": "evil.js"}')
    (outside / "evil.js").write_text("export default 1;\n")
    (d / "node_modules" / "evil").symlink_to(outside)
    with pytest.raises(ToolchainError, match=r"has no module for '\.'"):  # a link out of the agent is not followed
        g.resolve("agent.ts", "evil")
    g2 = ModuleGraph.of_dir(d)
    g2.resolve("agent.ts", "./lib")
    g2.resolve("lib/index.ts", "p")
    assert g2.cycle_note() == ""
    g2.resolve("lib/index.ts", "../agent.js")
    assert g2.cycle_note() == "agent.ts -> lib/index.ts -> agent.ts"
