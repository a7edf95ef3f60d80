"""Export one preference of a bundle as a merged PEFT adapter (or, with --merged-model, a merged HF model).

The method is the bundle's default unless ``decode.method=`` says otherwise, and so is alpha (``decode.alpha=``);
a MAGE method exports its Bone Soup policy, since value-model guidance is not weights (see mage_ray/export.py).
The adapter loads with ``peft.PeftModel.from_pretrained(<base model>, <out>)``; ``<out>/export.json`` records
the method, preference, alpha and the coefficient of every backbone. Runs in this process, without Ray.

    mage-ray export --config configs/embedded.yaml --bundle runs/embedded/bundle --preference 0.3,0.7 --out /tmp/mu37
    mage-ray export --config configs/smoke.yaml --bundle <dir> --preference 0.5,0.5 --out /tmp/m --merged-model
"""

from __future__ import annotations

from mage_ray.commands import open_bundle


def add_arguments(parser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle directory (from the sweep)")
    parser.add_argument(
        "--preference", required=True, help="mu, one weight per objective, e.g. 0.3,0.7 or '[0.3, 0.7]'"
    )
    parser.add_argument("--out", required=True, help="output directory (new, empty or an earlier export)")
    parser.add_argument(
        "--merged-model", action="store_true", help="write the merged model (W0 + deltas), not an adapter"
    )
    parser.add_argument("--device", default="cpu", help="device for --merged-model (cpu, cuda)")
    parser.set_defaults(checks=("bundle", "storage"))  # mage_ray.preflight; --out is its output


def run(args, cfg) -> None:
    from mage_ray.decode import decode_defaults
    from mage_ray.export import ExportError, export_preference
    from mage_ray.soup import PreferenceError, parse_preference

    bundle = open_bundle(args.bundle)
    try:
        mu = parse_preference(args.preference)
    except PreferenceError as e:
        raise SystemExit(f"error: {e}") from None
    d = decode_defaults(cfg, bundle, args.overrides)  # the bundle's method and alpha unless overridden
    try:
        record = export_preference(
            bundle,
            mu,
            args.out,
            method=d.method,
            alpha=d.alpha,
            merged_model=args.merged_model,
            device=args.device,
        )
    except ExportError as e:
        raise SystemExit(f"error: {e}") from None
    if record["exported_method"] != record["method"]:
        print(
            f"note: {record['method']} guides decoding with value models; exported its Bone Soup policy (bs)"
        )
    coeffs = ", ".join(f"{rel} {c:+.4f}" for rel, c in record["coefficients"].items())
    print(
        f"exported {record['exported_method']} at mu = {record['preference']} (alpha {record['alpha']:g}): {coeffs}"
    )
    print(f"{record['format']}: {args.out}")
