"""Where a stage runs: the auto / true / false choice between this process and Ray, and what
the stage sees of the cluster (recsys.execution, pipelines.ray_env.cluster_view)."""

import pytest

from pipelines.ray_env import cluster_view, is_local_address
from recsys.execution import ClusterView, choose_path
from recsys.semantic_ids.build import IdsConfig

ONE_NODE, TWO_NODES = ClusterView(nodes=1), ClusterView(nodes=2)


def test_forced_paths_win_and_say_so():
    for cluster in (ClusterView(), TWO_NODES):
        assert choose_path("ids.use_ray", True, cluster, "w").use_ray
        placement = choose_path("ids.use_ray", False, cluster, "w")
        assert not placement.use_ray and placement.reason == "ids.use_ray=false"


def test_auto_is_in_process_on_one_node_and_ray_on_a_cluster():
    for alone in (ClusterView(), ONE_NODE):
        placement = choose_path("embed.encoder.use_ray", "auto", alone, "12101 texts")
        assert not placement.use_ray
        assert "one node, 12101 texts" in placement.reason and "embed.encoder.use_ray=true forces Ray" in placement.reason
    for cluster, words in [(TWO_NODES, "a Ray cluster of 2 nodes"),
                           (ClusterView(remote_address="ray://head:10001"), "the Ray cluster at ray://head:10001")]:
        placement = choose_path("ids.use_ray", "auto", cluster, "w")
        assert placement.use_ray and words in placement.reason
        assert placement.line("ids").startswith("ids: on Ray (auto: ")


def test_a_ray_only_configuration_takes_ray_and_refuses_false():
    cfg = IdsConfig(method="hkmeans", hkmeans_top="blocks")
    assert choose_path("ids.use_ray", "auto", ONE_NODE, "w", cfg.ray_only).use_ray
    with pytest.raises(ValueError, match="ids.use_ray=false, but ids.hkmeans_top=blocks reads the table"):
        choose_path("ids.use_ray", False, ONE_NODE, "w", cfg.ray_only)
    assert IdsConfig(method="rqvae", hkmeans_top="blocks").ray_only == ""  # blocks concern k-means only


@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_use_ray_accepts_only_auto_true_false(value):
    with pytest.raises(ValueError, match=r"ids.use_ray=.* is not allowed; choose auto, true or false"):
        IdsConfig(use_ray=value)


def test_local_and_remote_addresses():
    for local in ("auto", "127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:10001", "http://127.0.0.1:8265"):
        assert is_local_address(local), local
    # TEST-NET-3 (RFC 5737): never an address of this machine; the name never resolves
    for remote in ("203.0.113.7:6379", "ray://203.0.113.7:10001", "no-such-host.invalid:6379"):
        assert not is_local_address(remote), remote


def test_a_remote_ray_address_is_a_cluster_without_contacting_it(monkeypatch):
    import pipelines.ray_env as ray_env

    monkeypatch.setenv("RAY_ADDRESS", "ray://203.0.113.7:10001")
    monkeypatch.setattr(ray_env, "ray_running", lambda: False)
    monkeypatch.setattr(ray_env, "init_ray", lambda: pytest.fail("a remote cluster must not be joined to decide"))
    assert cluster_view() == ClusterView(remote_address="ray://203.0.113.7:10001")
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_view() == ClusterView()  # no Ray here and none asked for: this machine alone


@pytest.mark.ray
def test_the_shared_local_ray_is_one_node(ray_session, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    view = cluster_view()
    assert view == ClusterView(nodes=1) and not view.is_cluster
