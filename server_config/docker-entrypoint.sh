#!/bin/sh
# Starts the serving stack: renders server_config/nginx for the configured ports,
# then hands over to supervisord (nginx + the app). The Docker image and the
# serving-stack test both start the stack through this one script.
set -eu

config_dir=$(cd "$(dirname "$0")" && pwd)

export FC_API_PORT="${FC_API_PORT:-9000}"        # the controller's port
export FC_WEB_PORT="${FC_WEB_PORT:-9001}"        # the front end's port
export FC_PORT="${FC_PORT:-5000}"                # the app's bottle server (loopback)
export FC_APP_DIR="${FC_APP_DIR:-/app}"
export FC_APP_MAIN="${FC_APP_MAIN:-$FC_APP_DIR/main.py}"
export FC_PYTHON="${FC_PYTHON:-python3}"
export FC_RUN_DIR="${FC_RUN_DIR:-/run/fc-app}"   # rendered config and pid files

mkdir -p "$FC_RUN_DIR"
sed -e "s|\${FC_API_PORT}|$FC_API_PORT|g" \
    -e "s|\${FC_WEB_PORT}|$FC_WEB_PORT|g" \
    -e "s|\${FC_PORT}|$FC_PORT|g" \
    -e "s|\${FC_RUN_DIR}|$FC_RUN_DIR|g" \
    "$config_dir/nginx" > "$FC_RUN_DIR/nginx.conf"

exec supervisord -c "$config_dir/supervisord.conf"
