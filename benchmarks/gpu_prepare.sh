#!/usr/bin/env bash
# On the development machine, before a GPU session: fill .whl (the server, structured-output and GGUF wheels the
# GPU machine lacks, for its Python 3.12) and .shared (stories260K and the Qwen3 tokenizer), both ignored by git and
# carried to the GPU machine (run's carry: [".whl", ".shared"]); then: bash benchmarks/gpu_session.sh STAGES...
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl .shared/models .shared/tokenizers
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || printf "/.whl/\n/.shared/\n" >> .git/info/exclude
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64"
platforms="$platforms --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for spec in fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4 pydantic_core==2.46.4 \
    typing-inspection==0.4.2 annotated-types openai==3.54.0 distro jiter==0.19.0 sniffio httpx2==2.16.2 \
    httpcore2==2.16.2 truststore==0.10.5 opentelemetry-api==1.45.2 anyio==4.16.0 idna==3.20 h11==0.16.0 \
    xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 gguf==0.19.0 jsonschema==4.26.0 referencing==0.37.0 rpds-py \
    jsonschema-specifications typing_extensions==4.16.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl "$spec" 2>&1 | grep -v "^WARNING" || true
done
cp -r ../shared/models/stories260K .shared/models/
cp -r ../shared/tokenizers/qwen3 .shared/tokenizers/
cp ../shared/README.md .shared/
du -sh .whl .shared
