from pathlib import Path

import pytest
import torch
import yaml

from tba_fed import TBAInputError
from tba_fed.config import load_config
from tba_fed.federation.config import load_federated_config, load_site_config
from tba_fed.deploy.profile import site_errors, development_run, run_errors
from tba_fed.federation.site_admission import check_model
from tba_fed.deploy.simulate import absolute_paths, site_gpus


def test_device_auto_resolves_to_what_torch_sees(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "vit_tiny_patch16_224"}, "device": "auto"}))
    assert load_config(path).device == ("cuda" if torch.cuda.is_available() else "cpu")
    path.write_text(yaml.safe_dump({"model": {"name": "vit_tiny_patch16_224"}, "device": "tpu"}))
    with pytest.raises(TBAInputError, match="device: .*unknown device 'tpu'"):
        load_config(path)


def test_simulated_sites_share_a_gpu_only_when_asked():
    assert site_gpus("cuda", 4) == 0.25 and site_gpus("cuda:1", 3) == 0.3333 and site_gpus("cpu", 3) == 0.0


def test_federated_config_validation_names_fields(tmp_path):
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "vit_tiny_patch16_224"}, "plan": "1->2",
                                    "federation": {"num_sites": 2, "min_sites": 3}}))
    with pytest.raises(TBAInputError, match=r"federation.min_sites: 3 exceeds num_sites \(2\)"):
        load_federated_config(path)
    path.write_text(yaml.safe_dump({"model": {"name": "vit_tiny_patch16_224"}, "federation": {"round_timout": 5}}))
    with pytest.raises(TBAInputError, match="federation.round_timout: unknown key"):
        load_federated_config(path)
    path.write_text(yaml.safe_dump({"model": {"name": "vit_tiny_patch16_224"}, "output": "rel/out",
                                    "data": {"source": "image_folder", "path": "rel/images"}}))
    resolved = absolute_paths(load_federated_config(path))
    assert resolved.output.is_absolute() and resolved.data.path.is_absolute()
    assert resolved.audit_log == resolved.output.with_name("out.audit.jsonl")  # beside the output, not in it
    path.write_text(yaml.safe_dump({"model": {"name": "vit_tiny_patch16_224"}, "audit": "rel/server.jsonl"}))
    assert absolute_paths(load_federated_config(path)).audit_log == Path("rel/server.jsonl").resolve()
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "h", "data": {"source": "synthetic"}}))
    with pytest.raises(TBAInputError, match="output: Field required"):
        load_site_config(site)
    site.write_text(yaml.safe_dump({"name": "h", "data": {"source": "synthetic"}, "output": "out"}))
    with pytest.raises(TBAInputError, match="privacy: Field required"):  # a site must state its policy
        load_site_config(site)
    site.write_text(yaml.safe_dump({"name": "h", "data": {"source": "synthetic"}, "output": "out",
                                    "privacy": {"epsilon": 1.0}}))
    with pytest.raises(TBAInputError, match="privacy.ledger: must be set"):
        load_site_config(site)
    site.write_text(yaml.safe_dump({"name": "h", "data": {"source": "synthetic"}, "output": "out",
                                    "privacy": {"epsilon": 1.0, "ledger": "l.json"}}))
    with pytest.raises(TBAInputError, match="^state: the production profile keeps a state directory"):
        load_site_config(site)
    site.write_text(yaml.safe_dump({"name": "h", "data": {"source": "synthetic"}, "output": "out",
                                    "privacy": {"epsilon": 1.0, "ledger": "l.json"}, "state": "state"}))
    assert load_site_config(site).audit_log == Path("out/audit.jsonl")  # outside out/compressed, replaced on install
    site.write_text(yaml.safe_dump({"name": "h", "data": {"source": "fashion_mnist", "num_images": 500}, "output": "out",
                                    "privacy": {"epsilon": 1.0, "ledger": "l.json"}, "state": "state"}))
    with pytest.raises(TBAInputError, match=r"^data.num_images: a site decides for each image alone whether it is used"):
        load_site_config(site)  # the first 500 of a permutation of all images: one added image moves the others


def test_shipped_federated_and_deployment_configs_validate():
    configs = Path(__file__).resolve().parent.parent / "configs"
    for path in configs.glob("federated-*.yaml"):  # simulations: development, which simulate refuses to override
        development_run(load_federated_config(path))
    sites = sorted((configs / "deployment").glob("site-*.yaml"))
    assert len(sites) == 3
    for path in sites:
        site = load_site_config(path)
        assert site.privacy.require_dp and site.privacy.ledger is not None
        assert site.profile == "production" and site_errors(site) == [] and site.model is not None
    private = load_federated_config(configs / "deployment" / "run.yaml")
    assert private.privacy is not None and private.privacy.seed is None  # deployments draw secure noise
    assert private.profile == "production" and run_errors(private) == []
    assert set(private.superlink.sites) == {load_site_config(path).name for path in sites}
    for path in sites:  # every site serves exactly the run's model
        check_model(path.stem, load_site_config(path).model, private.model)
