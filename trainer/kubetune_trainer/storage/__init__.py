"""Everything the trainer does with S3, on the layout of ``kubetune_api.layout``.

- ``store``: ``S3Store``, one bucket with verified transfers and one retry loop for every call;
- ``errors``: why a call failed (refused, worth retrying, other) and the exit code it ends with;
- ``paths``: s3:// URIs and the local files that map to keys;
- ``checkpoints``: resumable checkpoints of a run, uploaded with a completion marker;
- ``publish``: the adapter and merged-model publications, their manifests and verification.
"""
