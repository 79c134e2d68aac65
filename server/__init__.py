"""Process plumbing every Tandem component shares: the gRPC server and its one error interceptor,
process lifecycle and readiness, configuration of a server, auth and TLS, tracing, metrics, the
proto <-> engine conversions, and the workers' shared bootstrap (`server.worker`)."""
