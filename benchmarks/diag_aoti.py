"""Where does the AOTInductor round trip of a transformed FFN crash? (GPU; issue 15.)

Each variant runs in its own process (a segfault ends only that one) and prints the stage it
reached: ``transform``, ``save`` (export + AOTI compile), ``load``, ``run M=...``. The variants
separate torch's AOTI from fxscale's ops: a bf16 model alone; fxscale with every GEMM pinned to
cuBLAS (``torch._scaled_mm`` in the package, no user Triton kernel); the Triton kernels without
the persistent TMA tilings (no device-side descriptors, so no global scratch); static batch
against dynamic batch; the C++ wrapper at -O0 (as the test) and at inductor's default.

    python benchmarks/diag_aoti.py [--md OUT.md]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

_BODY = textwrap.dedent('''
    import sys, tempfile, torch, fxscale
    from fxscale.kernels import cuda as kc, triton_fp8 as tk
    torch.manual_seed(0)
    V = {variant!r}
    def say(s): print("STAGE", s, flush=True)
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
    args = ap.parse_args()
    rows = ["| variant | last stage | rc | notes |", "|---|---|---|---|"]
    for name, v in VARIANTS.items():
        try:
            p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _BODY.format(variant=v)],
                               check=False, capture_output=True, text=True, timeout=args.timeout)
            out, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        stages = [ln.split(" ", 1)[1] for ln in out.splitlines() if ln.startswith("STAGE ")]
        notes = [ln for ln in out.splitlines() if ln.startswith(("M=", "custom ops"))]
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
