"""Secure aggregation (Flower's SecAgg+) of named float64 arrays: the server gets the sum, within the
documented quantisation bound, and no reply it receives holds one site's arrays.

In-process tests deliver every Message, serialised and deserialised like on the wire, to a real
ClientApp per node (its mods applied, one persistent Context per node); one test runs a real
``flower-superlink --simulation`` with ``flwr run`` on a tiny app written to a temp directory that
mixes a Message-API query round with two secure sums.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Message
from flwr.common import bytes_to_ndarray

from tba_fed.federation.secure_aggregation import (SecureSumRefused, quantisation_error_bound, scaled_for_secagg,
                                                   secure_sum)
from tba_fed.errors import FederationError
from tba_fed.deploy.processes import flower_env, free_port, local_superlink

from clientapp_grid import ClientAppGrid

# The sites of every test: the client module is written into the simulated app and imported here as is.
CLIENT_SOURCE = textwrap.dedent('''
    """Test sites: deterministic arrays from the partition id; one site can be told to break its bound."""
    import numpy as np
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    from tba_fed.federation import logged
    from tba_fed.federation.secure_aggregation import register_secure_fit

    BOUNDS = {"matrix": 1000.0, "vector": 5.0}
    SHAPES = {"matrix": (16, 16), "vector": (128,)}


    def site_arrays(partition):
        rng = np.random.default_rng(1000 + partition)
        a = rng.standard_normal((16, 16))
        return {"matrix": 1000.0 * np.tanh(a + a.T), "vector": rng.uniform(-5.0, 5.0, 128)}


    def compute(config, context):
        partition = int(context.node_config["partition-id"])
        arrays = site_arrays(partition)
        if partition == int(config.get("overflow-partition", -1)):
            arrays["matrix"] = 3.0 * arrays["matrix"]
        return arrays, dict(BOUNDS)


    app = ClientApp(mods=[logged])  # logs as tba-fed's ClientApp does


    @app.query("ping")
    def ping(msg, context):
        pong = ConfigRecord({"partition": int(context.node_config["partition-id"])})
        return Message(RecordDict({"pong": pong}), reply_to=msg)


    register_secure_fit(app, compute)
''')

SERVER_SOURCE = textwrap.dedent('''
    """Test server: a query round, a secure sum, a query round, then a secure sum one site refuses."""
    import json
    from pathlib import Path

    import numpy as np
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.serverapp import ServerApp

    from sa_client import BOUNDS, SHAPES
    from tba_fed.federation.secure_aggregation import secure_sum
    from tba_fed.errors import FederationError
    from tba_fed.federation.rounds import wait_for_nodes

    app = ServerApp()


    @app.main()
    def main(grid, context):
        out = Path(str(context.run_config["out-dir"]))
        nodes = wait_for_nodes(grid, 3, 3, 60)

        def ping():
            messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="query.ping")
                        for node in nodes]
            return sorted(int(r.content["pong"]["partition"]) for r in grid.send_and_receive(messages, timeout=60))

        before = ping()
        result = secure_sum(grid, nodes, {"tag": "ok"}, BOUNDS, SHAPES, timeout=60, min_sites=3)
        after = ping()
        try:
            secure_sum(grid, nodes, {"overflow-partition": 2}, BOUNDS, SHAPES, timeout=60, min_sites=3)
            refusal = ""
        except FederationError as err:
            refusal = str(err)
        np.savez(out / "sum.npz", **result.arrays)
        (out / "result.json").write_text(json.dumps({"sites": result.sites, "error_bound": result.error_bound,
                                                     "seconds": result.seconds, "before": before, "after": after,
                                                     "refusal": refusal}))
''')

PYPROJECT = textwrap.dedent('''
    [build-system]
    requires = ["hatchling"]
    build-backend = "hatchling.build"

    [project]
    name = "secure-sum-test"
    version = "0.1.0"
    dependencies = []

    [tool.flwr.app]
    publisher = "tba-fed-tests"

    [tool.flwr.app.components]
    serverapp = "sa_server:app"
    clientapp = "sa_client:app"

    [tool.flwr.app.config]
    out-dir = ""
''')


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """The client module the simulation runs, imported into this process."""
    path = tmp_path_factory.mktemp("sa-client") / "sa_client.py"
    path.write_text(CLIENT_SOURCE)
    spec = importlib.util.spec_from_file_location("sa_client_inprocess", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _received_arrays(replies: list[Message]) -> list[np.ndarray]:
    """Every array in every reply: array records, and ndarrays serialised as bytes in config records (how
    SecAgg+ sends masked vectors); other bytes (public keys, ciphertexts) are not arrays."""
    found = []
    for reply in replies:
        if not reply.has_content():
            continue
        for record in reply.content.array_records.values():
            found += [array.numpy() for array in record.values()]
        for record in reply.content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes) and item.startswith(b"\x93NUMPY"):
                        found.append(bytes_to_ndarray(item))
        for record in reply.content.metric_records.values():
            found += [np.asarray(v, dtype=float) for v in record.values()]
    return found


def _reveals(candidate: np.ndarray, secret: np.ndarray) -> bool:
    """A reply array gives a site's array away: equal to it within 1e-3 relative, or correlated > 0.5."""
    a, b = np.asarray(candidate, dtype=float).ravel(), np.asarray(secret, dtype=float).ravel()
    if a.size != b.size:
        return False
    if np.allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max()):
        return True
    return a.std() > 0 and b.std() > 0 and abs(float(np.corrcoef(a, b)[0, 1])) > 0.5


def _plain_sum(sites, count: int) -> dict[str, np.ndarray]:
    arrays = [sites.site_arrays(i) for i in range(count)]
    return {name: sum(a[name] for a in arrays) for name in sites.SHAPES}


def _check_sum(result, expected: dict, sites: int) -> None:
    """The secure sum equals the plain sum within its error bound, and quantisation did perturb it."""
    assert result.sites == sites and sorted(result.arrays) == sorted(expected)
    for name, value in expected.items():
        error = float(np.abs(result.arrays[name] - value).max())
        assert result.error_bound[name] > 0
        assert 0 < error <= result.error_bound[name], (name, error, result.error_bound[name])
        assert result.arrays[name].shape == value.shape and result.arrays[name].dtype == np.float64


def test_error_bound_formula():
    """n * bound * 2/Q (+ float64 slack): 3 sites, bound 1000, Q = 2**22 -> 1.43e-3."""
    assert quantisation_error_bound(1000.0, 3, 2**22) == pytest.approx(3 * 1000.0 * 2 / 2**22, rel=1e-6)
    assert quantisation_error_bound(1000.0, 3, 2**22) > 3 * 1000.0 * 2 / 2**22


def test_secure_sum_in_process_is_correct_and_no_reply_reveals_a_site(sites, server_identity):
    from flwr.clientapp import ClientApp

    assert isinstance(sites.app, ClientApp)  # the real ClientApp, mods and all
    grid = ClientAppGrid(sites.app, 3)
    result = secure_sum(grid, grid.get_node_ids(), {"tag": "in-process"}, sites.BOUNDS, sites.SHAPES, timeout=10,
                        min_sites=3)
    expected = _plain_sum(sites, 3)
    _check_sum(result, expected, 3)
    # the matrix bound: 3 * 1000 * 2 / 2**22 = 1.4e-3; a few hundred entries reach a good part of it
    error = float(np.abs(result.arrays["matrix"] - expected["matrix"]).max())
    assert result.error_bound["matrix"] == pytest.approx(1.430511474609375e-3, rel=1e-6)
    assert error > 0.1 * result.error_bound["matrix"]

    captured = _received_arrays(grid.received)
    # non-vacuous: the masked vectors went through the server (3 sites x [weight factor, matrix, vector])
    assert sum(a.shape == (16, 16) for a in captured) == 3 and sum(a.shape == (128,) for a in captured) == 3
    secrets = []
    for i in range(3):
        raw = sites.site_arrays(i)
        secrets += [raw[name] for name in raw] + [raw[name] / sites.BOUNDS[name] for name in raw]
    # the detector would catch a site's arrays even after SecAgg+'s quantisation, but no reply does
    q = 2**22
    assert _reveals(np.round((secrets[3] + 1) * q / 2), secrets[3])
    leaks = [(a.shape, i) for a in captured for i, secret in enumerate(secrets) if _reveals(a, secret)]
    assert leaks == []
    assert grid.raised == {}


def test_two_sites_and_node_subset(sites, server_identity):
    """2 sites: Flower's SecAgg+ needs >= 2 and its integer num_shares must exceed 2 (the float form is used);
    sums over exactly the given nodes, not every connected one."""
    grid = ClientAppGrid(sites.app, 4)
    nodes = grid.get_node_ids()[:2]
    result = secure_sum(grid, nodes, {}, sites.BOUNDS, sites.SHAPES, timeout=10, min_sites=2)
    _check_sum(result, _plain_sum(sites, 2), 2)
    asked = {reply.metadata.src_node_id for reply in grid.received}
    assert asked == set(nodes)


def test_refusing_site_is_named_and_too_few_sites_fail(sites, server_identity):
    grid = ClientAppGrid(sites.app, 3)
    nodes = grid.get_node_ids()
    with pytest.raises(FederationError, match=r"2 sites summed, min_sites is 3") as info:
        secure_sum(grid, nodes, {"overflow-partition": 2}, sites.BOUNDS, sites.SHAPES, timeout=10, min_sites=3)
    refuser = nodes[2]
    assert f"node {refuser}: site error 2" in str(info.value) and "exceeds its bound 1000" in str(info.value)
    # refused with an error reply, not raised: raised, Flower prints a traceback and exits the task with code 800
    assert grid.raised == {}
    # the refusing site sent nothing but public keys, key shares and its error
    from_refuser = [r for r in grid.received if r.metadata.src_node_id == refuser]
    assert [r.has_error() for r in from_refuser] == [False, False, True]
    assert not any(a.shape == (16, 16) for a in _received_arrays(from_refuser))
    # with min_sites=2 the other two sites' sum goes through (SecAgg+ removes the dropped site's masks)
    grid = ClientAppGrid(sites.app, 3)
    result = secure_sum(grid, grid.get_node_ids(), {"overflow-partition": 2}, sites.BOUNDS, sites.SHAPES, timeout=10,
                        min_sites=2)
    _check_sum(result, _plain_sum(sites, 2), 2)


def test_silent_sites(sites, server_identity):
    """One silent site: summed over the other two; two silent sites: SecAgg+ halts, the error names them."""
    grid = ClientAppGrid(sites.app, 3, silent=(102,))
    result = secure_sum(grid, grid.get_node_ids(), {}, sites.BOUNDS, sites.SHAPES, timeout=1, min_sites=2)
    _check_sum(result, _plain_sum(sites, 2), 2)
    grid = ClientAppGrid(sites.app, 3, silent=(101, 102))
    with pytest.raises(FederationError, match=r"halted without a result.*node 101: no reply within 1 s; "
                                              r"node 102: no reply within 1 s"):
        secure_sum(grid, grid.get_node_ids(), {}, sites.BOUNDS, sites.SHAPES, timeout=1, min_sites=2)


@pytest.mark.parametrize("change,message", [
    (lambda a, b: a.update(matrix=a["matrix"][:8]), "shape"),
    (lambda a, b: a["vector"].__setitem__(0, np.nan), "non-finite"),
    (lambda a, b: a.pop("vector"), "differ from the requested"),
    (lambda a, b: b.update(vector=6.0), "the server scales by 5"),
    (lambda a, b: a.update(vector=a["vector"] * 2.0), "exceeds its bound 5"),
])
def test_site_refuses_bad_arrays(sites, change, message):
    arrays, bounds = sites.site_arrays(0), dict(sites.BOUNDS)
    change(arrays, bounds)
    with pytest.raises(SecureSumRefused, match=message):
        scaled_for_secagg(arrays, bounds, sites.SHAPES, sites.BOUNDS)


def test_sorted_order_and_scaling(sites):
    arrays = sites.site_arrays(1)
    scaled = scaled_for_secagg(arrays, sites.BOUNDS, sites.SHAPES, sites.BOUNDS)
    assert [a.shape for a in scaled] == [(16, 16), (128,)]  # "matrix" < "vector"
    np.testing.assert_array_equal(scaled[1], arrays["vector"] / 5.0)


def test_bad_requests_fail_before_any_message(sites):
    grid = SimpleNamespace(send_and_receive=lambda *a, **k: pytest.fail("sent"))
    for kwargs, message in (({"min_sites": 1}, "min_sites"), ({"quantization_range": 2**31}, "quantization_range"),
                            ({"reconstruction_threshold": 1}, "reconstruction_threshold")):
        with pytest.raises(ValueError, match=message):
            secure_sum(grid, [1, 2, 3], {}, sites.BOUNDS, sites.SHAPES, timeout=1, **{"min_sites": 2, **kwargs})
    with pytest.raises(ValueError, match="same arrays"):
        secure_sum(grid, [1, 2, 3], {}, {"matrix": 1.0}, sites.SHAPES, timeout=1, min_sites=2)
    with pytest.raises(ValueError, match="must not start"):
        secure_sum(grid, [1, 2, 3], {"secure-sum.shapes": "x"}, sites.BOUNDS, sites.SHAPES, timeout=1, min_sites=2)


@pytest.mark.slow  # flower-superlink --simulation and flwr run
def test_real_simulation(tmp_path, sites):
    """flower-superlink --simulation + flwr run: query round, secure sum, query round, refused secure sum."""
    app, home, out = tmp_path / "app", tmp_path / "home", tmp_path / "out"
    for folder in (app, home, out):
        folder.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "sa_client.py").write_text(CLIENT_SOURCE)
    (app / "sa_server.py").write_text(SERVER_SOURCE)
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "sa"\n\n[superlink.sa]\naddress = "127.0.0.1:{port}"\n'
                                      'insecure = true\n')
    flwr = str(Path(sys.executable).with_name("flwr"))
    start = time.monotonic()
    with local_superlink(home, port, simulation=True):
        completed = subprocess.run([flwr, "run", str(app), "sa", "--stream", "--federation-config",
                                    "num-supernodes=3 client-resources-num-cpus=1", "--run-config",
                                    f"out-dir={json.dumps(str(out))}"], env=flower_env(home), cwd=app, timeout=240,
                                   capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    log = completed.stdout[-4000:] + completed.stderr[-4000:]
    assert completed.returncode == 0 and (out / "result.json").is_file(), log
    report = json.loads((out / "result.json").read_text())
    # the refusal is one WARNING line at the site (its magnitude stays there), never a traceback or Flower's exit 800
    output = completed.stdout + completed.stderr
    assert len(re.findall(r"WARNING.*secure sum refused: 'matrix': an entry exceeds its bound 1000 \(an entry of "
                          r"magnitude [\d.e+]+\)", output)) == 1, output[-4000:]
    assert "magnitude" not in report["refusal"]
    for noise in ("Traceback", "Exit Code: 800", "raised an exception"):
        assert noise not in output, (noise, output[-4000:])
    assert report["before"] == report["after"] == [0, 1, 2]  # Message-API rounds work around the secure sum
    got = dict(np.load(out / "sum.npz"))
    expected = _plain_sum(sites, 3)
    assert report["sites"] == 3
    for name, value in expected.items():
        error = float(np.abs(got[name] - value).max())
        assert 0 < error <= report["error_bound"][name], (name, error, report["error_bound"][name])
    assert report["error_bound"]["matrix"] == pytest.approx(quantisation_error_bound(1000.0, 3, 2**22))
    assert "2 sites summed, min_sites is 3" in report["refusal"] and "exceeds its bound 1000" in report["refusal"], \
        report["refusal"]
    assert seconds < 120, seconds
