"""Where does the AOTInductor round trip of a transformed FFN crash? (GPU; issue 15.)

Each variant runs in its own process (a segfault ends only that one) and prints the stage it
reached: ``transform``, ``save`` (export + AOTI compile), ``load``, ``run M=...``. The variants
separate torch's AOTI from fxscale's ops: a bf16 model alone; fxscale with every GEMM pinned to
cuBLAS (``torch._scaled_mm`` in the package, no user Triton kernel); the Triton kernels without
the persistent TMA tilings (no device-side descriptors, so no global scratch); static batch
against dynamic batch; the C++ wrapper at -O0 (as the test) and at inductor's default.

    python benchmarks/diag_aoti.py [--torch-only] [--md OUT.md]

``--torch-only``: the same question for torch's AOTI without fxscale (on the H200 machine of
2026-12-02 a plain bf16 Sequential segfaulted in ``aoti_load_package`` too).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

_BODY = textwrap.dedent('''
    import sys, tempfile, torch, fxscale
    from fxscale.kernels import cuda as kc, triton_fp8 as tk
    torch.manual_seed(0)
    V = {variant!r}
    import time
    T0 = time.time()
    def say(s): print("STAGE", s, f"(t={{time.time() - T0:.0f}} s)", flush=True)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).cuda().bfloat16().eval()
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    if V.get("pin"):
        kc.force(V["pin"])
    if V.get("no_tma"):
        tk.tma_ok = lambda *a, **k: False
    say("transform")
    if V.get("plain"):
        sm = model
        ref = model
    else:
        kw = {{"input_bounds": 8.0, "on_overflow": "clamp"}} if V.get("bounds") else {{}}
        sm = fxscale.transform(model, (x,), **kw)
        ref = sm
    say("save")
    cfg = {{}} if V.get("opt") else {{"aot_inductor.compile_wrapper_opt_level": "O0"}}
    d = tempfile.mkdtemp()
    if V.get("plain"):
        ep = torch.export.export(model, (x,), dynamic_shapes=({{0: torch.export.Dim("b", min=1, max=4096)}},))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=d + "/m.pt2", inductor_configs=cfg)
    else:
        path = fxscale.save(sm, (x,), d + "/m.pt2", dynamic_batch=V.get("dynamic", True), inductor_configs=cfg)
        print("custom ops:", fxscale.deploy.package_custom_ops(path), flush=True)
    say("load")
    run = fxscale.load(path)
    sizes = (256, 100, 512) if V.get("dynamic", True) else (256,)
    with torch.no_grad():
        for m in sizes:
            say(f"run M={{m}}")
            xm = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
            y = run(xm)
            torch.cuda.synchronize()
            r = ref(xm)
            rel = float((y.float() - r.float()).norm() / r.float().norm())
            print(f"M={{m}} rel={{rel:.2e}}", flush=True)
    say("done")
''')

# torch alone (no fxscale import): which way of packaging / loading a bf16 Linear-ReLU-Linear works
_TORCH = textwrap.dedent('''
    import os, subprocess, sys, tempfile, torch
    V = {variant!r}
    import time
    T0 = time.time()
    def say(s): print("STAGE", s, f"(t={{time.time() - T0:.0f}} s)", flush=True)
    torch.manual_seed(0)
    dev = V.get("device", "cuda")
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).to(dev).bfloat16().eval()
    x = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
    d = tempfile.mkdtemp()
    say("save")
    ep = torch.export.export(model, (x,))
    if V.get("legacy"):
        so = torch._export.aot_compile(model, (x,), options={{"aot_inductor.output_path": d + "/m.so"}})
        say("load")
        run = torch._export.aot_load(so, dev)
    else:
        # The C++ wrapper at -O0 (inductor's default -O1 compile of it is most of a package's time).
        cfg = {{"aot_inductor.compile_wrapper_opt_level": "O0", **V.get("cfg", {{}})}}
        path = torch._inductor.aoti_compile_and_package(ep, package_path=d + "/m.pt2", inductor_configs=cfg)
        if V.get("fresh"):
            say("load (fresh process)")
            code = ("import torch; r = torch._inductor.aoti_load_package(%r); x = torch.randn(256, 256, device=%r, "
                    "dtype=torch.bfloat16); print('fresh ok', float(r(x).float().abs().sum()))" % (path, dev))
            p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], check=False, capture_output=True, text=True)
            print("fresh rc", p.returncode, p.stdout[-300:], p.stderr[-1500:], flush=True)
            sys.exit(p.returncode)
        say("load")
        run = torch._inductor.aoti_load_package(path, run_single_threaded=V.get("single", False))
    say("run")
    with torch.no_grad():
        y = run(x)
        print("M=256 rel=%.2e" % float((y.float() - model(x).float()).norm() / model(x).float().norm()), flush=True)
    say("done")
''')

TORCH_VARIANTS = {
    "torch: package, load in the compiling process": {},
    "torch: package, load in a fresh process": {"fresh": True},
    "torch: package, run_single_threaded": {"single": True},
    "torch: package, constants not in the .so": {"cfg": {"aot_inductor.package_constants_in_so": False}},
    "torch: legacy aot_compile + aot_load (.so)": {"legacy": True},
    "torch: package on the CPU": {"device": "cpu"},
}

VARIANTS = {
    "bf16 model alone (torch AOTI)": {"plain": True},
    "fxscale, GEMMs pinned to cuBLAS": {"pin": "cublas"},
    "fxscale, Triton without TMA tilings": {"no_tma": True},
    "fxscale, default, static batch": {"dynamic": False},
    "fxscale, default, dynamic batch (the failing test)": {},
    "fxscale, declared bounds, dynamic batch": {"bounds": True},
    "fxscale, default, dynamic batch, wrapper at inductor's -O level": {"opt": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md", help="write the table here too")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per variant")
    ap.add_argument("--torch-only", action="store_true", help="torch's AOTI alone, no fxscale (its variants)")
    args = ap.parse_args()
    rows = ["| variant | last stage | rc | notes |", "|---|---|---|---|"]
    body, variants = (_TORCH, TORCH_VARIANTS) if args.torch_only else (_BODY, VARIANTS)
    # AOTI checks no input against the export's guards unless asked (a wrong size or device would
    # crash inside the package instead of raising).
    env = {**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"}
    for name, v in variants.items():
        try:
            p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", body.format(variant=v)],
                               check=False, capture_output=True, text=True, timeout=args.timeout, env=env)
            out, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        stages = [ln.split(" ", 1)[1] for ln in out.splitlines() if ln.startswith("STAGE ")]  # with its time
        notes = [ln for ln in out.splitlines() if ln.startswith(("M=", "custom ops", "fresh"))]
        err = [ln for ln in out.splitlines() if "Error" in ln or "Fatal" in ln or "File " in ln][-4:]
        rows.append(f"| {name} | {stages[-1] if stages else '-'} | {rc} | {'; '.join(notes + err)[:400]} |")
        sys.stdout.write(f"--- {name}: rc={rc}\n{out[-3000:]}\n")
        sys.stdout.flush()
    table = "\n".join(rows)
    sys.stdout.write(table + "\n")
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
