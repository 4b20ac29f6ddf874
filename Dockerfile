# wazuh-proxy container image.
#
# Base: `scratch`, holding one statically linked binary, the proxy's user and three directories.
# Why: the proxy needs no shell, no package manager and no C library at run time, so an empty
# base leaves nothing to patch or exploit besides the proxy itself (about 10 MB in all). The
# binary is linked statically against glibc (`-C target-feature=+crt-static` on the gnu
# target) rather than musl: it keeps jemalloc and the glibc resolver (the `files` and `dns`
# sources are built into glibc >= 2.34, so host names resolve without NSS modules), and it
# needs no extra Rust target. Not distroless: it would add a C library the binary does not use.
#
# Build from a clean checkout (the binary is compiled inside the build stage):
#
#     podman build -t wazuh-proxy:latest .        # or: docker build -t wazuh-proxy:latest .
#
# Build with a binary compiled beforehand on the host (no Rust image to pull; what CI does):
#
#     RUSTFLAGS="-C target-feature=+crt-static" \
#     CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
#         cargo build --release -p wazuh-proxy --target x86_64-unknown-linux-gnu
#     podman build --build-arg BINARY=prebuilt -t wazuh-proxy:latest .
#
# Runs as uid/gid 65532 with no capability: 1514, 1515 and 9514 are above 1024. Only
# `source = "transparent"` listeners need one (CAP_NET_ADMIN, for IP_TRANSPARENT).

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
# `build` compiles in the image below; `prebuilt` takes the binary from the build context.
ARG BINARY=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The gnu target named explicitly, so that build scripts and proc macros stay dynamic.
RUN RUSTFLAGS="-C target-feature=+crt-static" \
        CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
        cargo build --release -p wazuh-proxy --target x86_64-unknown-linux-gnu \
    && mkdir -p /out \
    && cp target/x86_64-unknown-linux-gnu/release/wazuh-proxy /out/wazuh-proxy \
    && /out/wazuh-proxy --version

FROM scratch AS prebuilt
ARG PREBUILT=target/x86_64-unknown-linux-gnu/release/wazuh-proxy
COPY ${PREBUILT} /out/wazuh-proxy

FROM ${BINARY} AS binary

FROM scratch
COPY deploy/image/rootfs/ /
COPY --from=binary /out/wazuh-proxy /usr/local/bin/wazuh-proxy
# Writable by the proxy's user: the upgrade socket and the enrollment certificate. (Their
# parents come from rootfs/, owned by root; else COPY --chown would make them the user's too.)
COPY --chown=65532:65532 deploy/image/state/ /run/wazuh-proxy/
COPY --chown=65532:65532 deploy/image/state/ /var/lib/wazuh-proxy/
USER 65532:65532
EXPOSE 1514/tcp 1514/udp 1515/tcp 9514/tcp
ENTRYPOINT ["/usr/local/bin/wazuh-proxy"]
CMD ["run", "--config", "/etc/wazuh-proxy/proxy.toml"]
