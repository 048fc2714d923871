# Build: docker build -t wfq .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin wfq

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home wfq
COPY --from=build /src/target/release/wfq /usr/local/bin/wfq
USER wfq
ENTRYPOINT ["wfq"]
CMD ["--help"]
