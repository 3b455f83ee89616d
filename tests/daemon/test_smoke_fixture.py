from support.daemons import eventually


def test_daemon_fixture_serves_and_stops(make_daemon):
    d = make_daemon()
    info = d.registry().node_info()
    assert info["pid"] == d.pid
    assert d.stop() == 0
    assert not d.alive()
