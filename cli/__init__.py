"""The `tandem` command (`cli.main`): one module per subcommand, the local-stack launcher
(`cli.launcher`) and the serving benchmark client behind `tandem bench` (`cli.serving_bench`)."""
