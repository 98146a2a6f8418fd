"""Ray: joining a cluster and its capacity, the TF_CONFIG backend for Ray Train, the launcher."""
