#!/bin/sh
# The serve image's entrypoint, and the one place that creates models and decides readiness:
#   finetune-serve                          start `ollama serve`, create every model listed in MODELS_FILE, serve
#   finetune-serve health                   the HEALTHCHECK (and `invoke serve`'s readiness check): ready once
#                                           this container has created every listed model and each one exists
#   finetune-serve create NAME MODELFILE GGUF   create one more model (`invoke eval`: the other built types)
# Each line of MODELS_FILE is `<model name> <Modelfile> <GGUF>`, paths relative to MODELS_FILE's
# directory: the GGUF is named here rather than read back out of the Modelfile, whose SYSTEM or MESSAGE text
# may hold a line that begins with "FROM ".
# A restart creates the models again: the same Modelfile gives the same model (its blobs are reused).
set -eu
MODELS_FILE=${MODELS_FILE:-/artifacts/serve/models}
READY_WAIT_S=${READY_WAIT_S:-60}
READY_FILE=${READY_FILE:-/tmp/finetune-serve.ready}  # the native runner keeps one per run

models() {
    grep -v '^[[:space:]]*\(#\|$\)' "$MODELS_FILE"
}

# create NAME MODELFILE GGUF: `ollama create`, paths relative to MODELS_FILE's directory.
create() {
    echo "serve: creating $1 from $2"
    # A FROM path that does not exist makes `ollama create` try to pull a model of that name instead.
    if [ -z "$3" ] || [ ! -f "$(dirname "$MODELS_FILE")/$3" ]; then
        echo "serve: $MODELS_FILE: $1: GGUF ${3:-(none listed)}: no such file (run \`invoke convert\`, then \`invoke serve\`)" >&2
        return 1
    fi
    if ! (cd "$(dirname "$MODELS_FILE")" && ollama create "$1" -f "$2"); then
        echo "serve: \`ollama create $1 -f $2\` failed" >&2
        return 1
    fi
}

if [ "${1:-}" = health ]; then
    # The store is a volume shared by runs: a model of the same name may exist before this container has
    # created its own, so healthy also needs this container's creates to have finished.
    [ -f "$READY_FILE" ] || exit 1
    models | while read -r name _; do
        ollama show "$name" >/dev/null 2>&1 || exit 1
    done
    exit
fi

if [ "${1:-}" = create ]; then
    shift
    create "${1:-}" "${2:-}" "${3:-}"
    exit
fi

if [ ! -r "$MODELS_FILE" ]; then
    echo "serve: no model list at $MODELS_FILE (mount artifacts/<run>/serve there; \`invoke serve\` writes it)" >&2
    exit 2
fi

rm -f "$READY_FILE"  # left by the run before a `docker restart`
ollama serve &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; exit 0' TERM INT

waited=0
until ollama list >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "serve: ollama serve exited before answering" >&2
        exit 1
    fi
    waited=$((waited + 1))
    if [ "$waited" -gt $((READY_WAIT_S * 10)) ]; then
        echo "serve: ollama serve did not answer within ${READY_WAIT_S} s" >&2
        exit 1
    fi
    sleep 0.1
done

models | while read -r name modelfile gguf; do
    create "$name" "$modelfile" "${gguf:-}" || exit 1
done || { kill -TERM "$server"; wait "$server" || true; exit 1; }
touch "$READY_FILE"
echo "serve: ready: $(models | cut -d' ' -f1 | tr '\n' ' ')"

wait "$server"
