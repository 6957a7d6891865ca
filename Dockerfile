# Multi-stage build: a static-enough release binary on a small non-root runtime image.
#   docker build -t entrepot .
#   docker run -p 5000:5000 -v entrepot-data:/var/lib/entrepot entrepot
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked && mkdir -p /store

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/entrepot /usr/local/bin/entrepot
# The default config equals the built-in defaults; mount your own over it.
COPY upstreams.toml /etc/entrepot/upstreams.toml
# An empty store owned by the runtime user, so a fresh named volume is writable.
COPY --from=build --chown=65532:65532 /store /var/lib/entrepot
ENV ENTREPOT_SERVER__STORAGE=/var/lib/entrepot \
    ENTREPOT_SERVER__LISTEN=0.0.0.0:5000
VOLUME ["/var/lib/entrepot"]
EXPOSE 5000
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/entrepot", "serve", "--config", "/etc/entrepot/upstreams.toml"]
