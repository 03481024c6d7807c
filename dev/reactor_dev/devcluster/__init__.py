"""A local Kubernetes control plane (etcd + kube-apiserver as processes), envtest-style."""
