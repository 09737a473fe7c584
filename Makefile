# Entry points for people and CI. Each target installs what it needs on Debian 12 or 13.
.PHONY: deb install check

# Build the source and binary packages into build/ (installs the build
# dependencies with apt when missing; DEB_BUILD_OPTIONS=nocheck skips the
# unit tests): build/macvlan-router_<version>_all.deb.
deb:
	debian/build-deb

# Build, install with apt (which brings python3-docker and the rest), and
# leave the service enabled and running. Where systemd is not PID 1 (a
# container, a chroot) the package installs and nothing is started.
install: deb
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Acquire::Retries=5 --reinstall \
		./build/macvlan-router_$$(dpkg-parsechangelog -S Version)_all.deb || \
	{ apt-get -q -o Acquire::Retries=5 update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Acquire::Retries=5 --reinstall \
		./build/macvlan-router_$$(dpkg-parsechangelog -S Version)_all.deb; }
	if [ -d /run/systemd/system ]; then \
		systemctl enable --now macvlan-router && \
		systemctl --no-pager status macvlan-router; \
	fi

# Run the whole test suite (unit, integration against a real Docker engine, package).
check:
	tests/run-all
