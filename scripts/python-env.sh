# Shared by scripts/serve.sh and scripts/test.sh (sourced, not run): make sure .venv exists and
# was made by a usable Python, and say exactly what to install when something is missing.
#
#   ensure_venv <tag>      creates .venv in the current directory if needed; messages start [<tag>]
#
# PYTHON picks the interpreter (default python3). The project supports Python 3.11 and 3.12.

ensure_venv() {
    local tag="$1" python="${PYTHON:-python3}"
    venv_die() { printf '[%s] ERROR: %s\n' "$tag" "$*" >&2; exit 1; }

    command -v "$python" >/dev/null \
        || venv_die "$python not found: install Python 3.11 (Debian 12: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3.11"
    "$python" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))' \
        || venv_die "$("$python" --version 2>&1) is not supported: this project needs Python 3.11 or 3.12 (set PYTHON=python3.11)"

    # Debian and Ubuntu ship venv's pip bootstrap separately, as python3-venv (python3.X-venv).
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        local package
        package="python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
            printf '[%s] installing %s (Python virtual environments) with apt-get\n' "$tag" "$package"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null 2>&1 \
                || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null; } \
                || venv_die "apt-get install $package failed"
        else
            venv_die "Python's venv module is missing: sudo apt-get install $package (or python3-venv)"
        fi
    fi

    # A .venv left half-made by an earlier failure (no pip inside) is started over.
    if [[ -x .venv/bin/python ]] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
        printf '[%s] .venv has no working pip; recreating it\n' "$tag"
        rm -rf .venv
    fi
    if [[ ! -x .venv/bin/python ]]; then
        printf '[%s] creating .venv with %s\n' "$tag" "$("$python" --version 2>&1)"
        "$python" -m venv .venv || venv_die "$python -m venv .venv failed (output above)"
    fi
}
