"""Take docs/mlflow_runs.png: the runs table of a search in the MLflow UI, in headless Chromium.

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --port 5055 &
    python docs/screenshot_runs.py --url 'http://127.0.0.1:5055/#/experiments/1/runs' --search search-smoke

Needs `chromium` (apt-get install chromium) and `websocket-client` (pip). It drives the page over
the DevTools protocol: closes the assistant panel, expands the search's run to show its trials
and final run, and adds the columns the README tells users to look at.
"""

import argparse
import base64
import json
import subprocess
import tempfile
import time
import urllib.request

COLUMNS = ["best_val_acc", "val_macro_f1", "folds_done", "best_epoch", "probe_val_acc", "head", "lr"]


def main() -> None:
    import websocket
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--search", required=True, help="the search run's name, e.g. search-smoke")
    p.add_argument("--out", default="docs/mlflow_runs.png")
    args = p.parse_args()
    profile = tempfile.mkdtemp()
    proc = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--remote-debugging-port=9333", f"--user-data-dir={profile}", "--window-size=2100,760",
                             "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                tabs = json.loads(urllib.request.urlopen("http://127.0.0.1:9333/json").read())
                break
            except OSError:
                time.sleep(0.3)
        ws = websocket.create_connection([t for t in tabs if t["type"] == "page"][0]["webSocketDebuggerUrl"])
        counter = [0]

        def call(method, **params):
            counter[0] += 1
            ws.send(json.dumps({"id": counter[0], "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == counter[0]:
                    return msg.get("result", {})

        def js(expr):
            call("Runtime.evaluate", expression=expr, returnByValue=True)
            time.sleep(3)

        call("Emulation.setDeviceMetricsOverride", width=2100, height=760, deviceScaleFactor=1, mobile=False)
        call("Page.navigate", url=args.url)
        time.sleep(10)
        js("[...document.querySelectorAll('button')].filter(b => b.getAttribute('aria-label') === 'Close')"
           ".forEach(b => b.click())")
        js(f"[...document.querySelectorAll('a')].find(a => a.textContent.trim() === '{args.search}')"
           ".closest('[role=row]').querySelector('button.du-bois-light-btn-icon-only').click()")
        js("[...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Columns').click()")
        js(f"for (const w of {json.dumps(COLUMNS)}) {{ const el = [...document.querySelectorAll('span,label,div')]"
           ".find(e => e.children.length === 0 && e.textContent.trim() === w);"
           " if (el) (el.closest('label') || el.parentElement).click(); }")
        js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}))")
        with open(args.out, "wb") as f:
            f.write(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
        print(f"written: {args.out}")
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
