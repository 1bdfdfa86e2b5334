"""Metrics and their Prometheus text rendering."""

from twisted.trial import unittest

from netsvc.metrics import Registry, ServiceMetrics


class RegistryTests(unittest.TestCase):
    def test_counterWithLabels(self):
        r = Registry()
        c = r.counter("x_total", "Things.", ["service"])
        c.labels(service="echo").inc()
        c.labels(service="echo").inc(2)
        c.labels(service='we"ird\n').inc()
        self.assertEqual(r.render(), (
            "# HELP x_total Things.\n"
            "# TYPE x_total counter\n"
            'x_total{service="echo"} 3\n'
            'x_total{service="we\\"ird\\n"} 1\n'))

    def test_gaugeCallback(self):
        r = Registry()
        g = r.gauge("open", "Open now.")
        g.children[()].setFunction(lambda: 7)
        self.assertIn("open 7\n", r.render())

    def test_histogram(self):
        r = Registry()
        h = r.histogram("lat_seconds", "Latency.", buckets=(0.1, 1))
        for v in (0.05, 0.5, 5):
            h.children[()].observe(v)
        text = r.render()
        self.assertIn('lat_seconds_bucket{le="0.1"} 1\n', text)
        self.assertIn('lat_seconds_bucket{le="1"} 2\n', text)
        self.assertIn('lat_seconds_bucket{le="+Inf"} 3\n', text)
        self.assertIn("lat_seconds_count 3\n", text)
        self.assertIn("lat_seconds_sum 5.55\n", text)

    def test_sameNameSameFamily(self):
        r = Registry()
        self.assertIs(r.counter("a", "A.", ["x"]), r.counter("a", "A.", ["x"]))
        self.assertRaises(ValueError, r.gauge, "a", "A.", ["x"])

    def test_familiesInNameOrder(self):
        r = Registry()
        r.gauge("b", "B.")
        r.counter("a", "A.")
        self.assertEqual([f.name for f in r.families()], ["a", "b"])

    def test_wrongLabels(self):
        self.assertRaises(ValueError, Registry().counter("a", "A.", ["x"]).labels, y="1")

    def test_serviceMetrics(self):
        r = Registry()
        m = ServiceMetrics(r, "echo")
        m.accepted.inc()
        m.refused("max_connections").inc()
        m.limit("idle_timeout").inc(2)
        text = r.render()
        self.assertIn('netsvc_connections_accepted_total{service="echo"} 1', text)
        self.assertIn('netsvc_connections_refused_total{service="echo",reason="max_connections"} 1', text)
        self.assertIn('netsvc_limits_triggered_total{service="echo",limit="idle_timeout"} 2', text)
