"""kubetune on a cluster, for the e2e suite and ``make demo``: the local stack, a cluster someone else runs, the demo.

Everything that knows about kubetune (the chart, the demo bucket, the example FinetuneJobs) lives here;
``localcluster`` provides the generic parts (control plane, kwok, node agent, S3, Prometheus).
"""
