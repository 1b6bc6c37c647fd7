#!/usr/bin/env python3
"""Dev check (not a test dependency): run onnx's checker with full_check (strict shape
inference) on every model.onnx under the given export folders or files.

    apt-get install -y python3-onnx        # Debian's onnx (1.12: opsets up to 17)
    /usr/bin/python3 scripts/check-onnx.py <export dir or model.onnx> ...

Checking by path lets onnx follow external data (model.onnx_data) and models above 2 GiB.
Exits 1 if any model fails.
"""
import sys
from pathlib import Path

try:
    import onnx
except ImportError:
    sys.exit("onnx is not installed for this python: apt-get install python3-onnx (then use /usr/bin/python3)")


def models(args):
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            yield from sorted(p.rglob("model.onnx"))
        else:
            yield p


def main(args):
    if not args:
        sys.exit(__doc__)
    failed = 0
    for path in models(args):
        model = onnx.load(str(path), load_external_data=False)
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
        try:
            onnx.checker.check_model(str(path), full_check=True)
            print(f"ok    {path}  (IR {model.ir_version}, opset {opsets}, {len(model.graph.node)} nodes)")
        except Exception as e:  # the checker raises several exception types
            failed += 1
            print(f"FAIL  {path}: {str(e).splitlines()[0]}")
    print(f"onnx {onnx.__version__}: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
