"""The figures README.md and results/benchmarks.md quote from the default eff.py run are the committed
results CSV's, rendered by benchmarks/quote_results.py: a document and the CSV never disagree; and that
run's file is named as today's eff.py names the same run."""
import importlib.util
import json
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("quote_results", ROOT / "benchmarks" / "quote_results.py")
quote_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quote_results)


def test_documents_quote_the_committed_default_run():
    csv = quote_results.default_run()
    table = quote_results.render(csv)
    for name in quote_results.DOCUMENTS:
        text = (ROOT / name).read_text()
        blocks = quote_results.BLOCK.findall(text)
        assert blocks, f"{name} quotes no default run"
        assert all(b[1] == table for b in blocks), f"{name} differs from {csv.name}: run benchmarks/quote_results.py"


def test_render_shows_each_configuration_and_batch(tmp_path):
    rows = [dict(config=c, method=m, batch=b, tokens_mean=t, gflops_per_image=g, latency_ms_median=ms,
                 speedup_median=s, speedup_iqr=0.05, busy=busy)
            for c, m, t, g, s in (("base", "base", 197, 35.1, 1.0), ("tome13", "tome", 125.5, 20.7, 1.5))
            for b, ms, busy in ((1, 200.0 / s, False), (8, 150.0 / s, True))]
    csv = tmp_path / "run.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    lines = quote_results.render(csv).splitlines()
    assert lines[2] == "| base | 197.0 | 35.1 | 200.0 | 150.0 | 1 | 1 |"
    assert lines[3] == "| tome13 | 125.5 | 20.7 | 133.3 | 100.0 | 1.50 (IQR 0.05) | 1.50 (IQR 0.05) |"
    assert "batch 1: not busy, batch 8: busy" in lines[-1]
    marked = "a\n<!-- eff-default:begin -->\nold\n<!-- eff-default:end -->\nb"
    assert quote_results.quote(marked, "new\n") == "a\n<!-- eff-default:begin -->\nnew\n<!-- eff-default:end -->\nb"


def test_the_committed_default_run_keeps_its_name():
    """The committed reference run (``python eff.py --full --out results``, the documented refresh, on a
    CPU: random weights, one torch thread, the samples' 1000-word vocabulary) records the configuration
    today's eff.py records for that command line, and is named as today's eff.py names it: a change to
    the code never renames it silently. A user's ``python eff.py --full`` (--out runs/) names the same
    run alike: --out is not part of the name; the quick default ``python eff.py`` is another
    configuration, with another name."""
    import eff
    from vwt import cli
    from vwt import efficiency as fx

    csv = quote_results.default_run()
    recorded = json.loads(csv.with_suffix(".json").read_text())["args"]
    spec = cli.spec_from_args(eff.parse_args(list(quote_results.REFRESH)), fx.Measurement)
    config = fx.run_config(spec, recorded["device"], recorded["weights"], recorded["threads"],
                           recorded["vocabulary_file"])
    assert config == recorded
    assert fx.stem(spec, "openai/clip-vit-base-patch16", fx.plan(spec), config) == csv.stem
    def named(argv):
        user = cli.spec_from_args(eff.parse_args(argv), fx.Measurement)
        mine = fx.run_config(user, recorded["device"], recorded["weights"], recorded["threads"],
                             recorded["vocabulary_file"])
        return mine, fx.stem(user, "openai/clip-vit-base-patch16", fx.plan(user), mine)

    full, full_stem = named(["--full"])
    assert full != config and full_stem == csv.stem
    quick, quick_stem = named([])
    assert quick_stem != csv.stem and {k for k in quick if quick[k] != full.get(k)} == set(fx.QUICK)  # paper_runs: named only when off
    compiled, compiled_stem = named(["--full", "--compile"])  # --compile is recorded, and names, only when given
    assert compiled == dict(full, compile=True) and compiled_stem != csv.stem
