# Entry points for people and CI. Each target installs what it needs on Debian 12.
.PHONY: deb install check

# Build the .deb into build/ (packaging helper fills this in).
deb:
	@echo "deb: not yet implemented" >&2; exit 1

# Build, install with apt, and leave the service enabled and running.
install: deb
	@echo "install: not yet implemented" >&2; exit 1

# Run the whole test suite (unit, integration against a real Docker engine, package).
check:
	tests/run-all
