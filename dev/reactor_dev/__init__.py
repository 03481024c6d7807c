"""Development tools for Reactor, kept out of the shipped package and the operator image:
the local control plane and one-node cluster (`devcluster`), the test helpers and scripted
model (`testing`) and the offline demo (`demo`). Installed into the virtualenv by
`make setup` (`pip install -e dev/`); it adds `reactor dev-cluster` to the CLI through the
`reactor.commands` entry point group."""
