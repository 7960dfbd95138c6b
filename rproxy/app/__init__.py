"""The application: command line, configuration, live reload, admin API, demo upstream, reactor."""
