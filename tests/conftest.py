pytest_plugins = ["latentmas.testing.fixtures"]
