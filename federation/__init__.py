"""What travels between sites and how the coordinator combines it.

site.py         Site: one site's side of the federation (message bytes in and out)
coordinator.py  Coordinator: everything the coordinator does with what the sites send
messages.py     Codec: the wire, in one place (encode / decode / check every message)
channel.py      PlainChannel / SecureChannel: how each message travels (whole or as a secure sum)
secure.py       SecureSite / SecureCoordinator: secure_aggregation's sums
rules.py        aggregation rules (FedAvg, FedAvgM, FedAdam, Scaffold)
engine.py       the thin wrapper over FeatureCloud's engine (the only module here that imports it)
payload.py, compress.py, checks.py, aggregate.py, summary.py: the pieces the above use
"""
