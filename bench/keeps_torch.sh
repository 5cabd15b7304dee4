#!/usr/bin/env bash
# Does `pip install -e .` keep a torch that is already installed (Colab's CUDA build, say)?
#
#     bash bench/keeps_torch.sh [TORCH_VERSION]     (default 2.14.0; needs the package index)
#
# A venv that sees this machine's packages (--system-site-packages, so only torch is new) gets
# torch==TORCH_VERSION of its own, then the project is installed into it as a Colab user would,
# without constraints.txt. Exits 1 if the install replaced that torch; then runs the fast tests
# under it. Writes bench/results/keeps_torch.md.
set -euo pipefail
cd "$(dirname "$0")/.."
want="${1:-2.14.0}"
venv="$(mktemp -d)/venv"
python -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps "torch==$want"
before="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
"$venv/bin/pip" install --disable-pip-version-check -e . > "$venv/install.log" 2>&1
after="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
installed="$(grep '^Installing collected packages' "$venv/install.log" || echo 'Installing collected packages: (none)')"
echo "torch before: $before; after pip install -e .: $after; $installed"
[ "$before" = "$after" ] || { echo "pip install -e . replaced torch $before with $after"; exit 1; }
start=$(date +%s)
tests="$("$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider 2>&1 | tail -1)"
echo "fast tests under torch $after: $tests ($(( $(date +%s) - start )) s)"
cat > bench/results/keeps_torch.md <<EOF
# pip install -e . keeps an installed torch

Measured $(date -u '+%Y-%m-%d %H:%M') UTC. Command: \`bash bench/keeps_torch.sh $want\`

A venv with \`--system-site-packages\` (this machine's packages, torch $(python -c 'import torch; print(torch.__version__)')),
then \`pip install --no-deps torch==$want\` into it, then \`pip install -e .\` (no constraints file).

- torch before the install: $before; after: $after
- pip's last step: $installed
- the fast tests under that torch: $tests
EOF
rm -rf "$(dirname "$venv")"
