"""Federated training on Flower: one model trained across data owners who keep their data.

`run.federate` partitions a corpus among clients (`partition`), starts a SuperLink and one
SuperNode per client on loopback (`launch`, TLS from `tls`), and runs the Flower app (`app`):
the ServerApp drives the rounds and commits each one (`server`), the ClientApp trains with
trustgen's own `train_steps` (`client`). Flower is an optional dependency
(`pip install 'trustgen[federated]'`); nothing here imports it until a federation runs.
"""
