# Sourced by the test scripts: make `node` (and node-gyp's headers) a Node >= 20.
#
# @powersync/node needs Node 20 or newer (its undici fails on 18 with "File is not defined"),
# and a fresh Debian 12 has 18. When the Node on PATH is older, Node 20 is installed from the npm
# registry (the `node-linux-<arch>` package carries the official binary and headers) into
# .tools/ and put first on PATH; native modules are then built against its headers.
node_env_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
if [ "$(node_env_major)" -lt 20 ]; then
  case "$(uname -m)" in
    x86_64) node_env_arch=x64 ;;
    aarch64 | arm64) node_env_arch=arm64 ;;
    *) echo "no Node >= 20 on PATH, and no npm package of Node for $(uname -m)" >&2; exit 1 ;;
  esac
  node_env_dir="$PWD/.tools/node20/node_modules/node-linux-$node_env_arch"
  if [ ! -x "$node_env_dir/bin/node" ]; then
    echo "Node on PATH is $(node --version 2>/dev/null || echo missing); installing Node 20 into .tools/node20" >&2
    npm install --prefix .tools/node20 --no-audit --no-fund --no-save "node-linux-$node_env_arch@20" >&2
  fi
  export PATH="$node_env_dir/bin:$PATH"
  export npm_config_nodedir="$node_env_dir"
fi
echo "node $(node --version) at $(command -v node)" >&2
