import requests
import time
import json
import os

URL = os.environ.get("INFEROS_AGENT_URL", "http://127.0.0.1:7031")
HEADERS = {"X-Inferos-Token": os.environ.get("INFEROS_AGENT_TOKEN", "")}

def monitor_metrics():
    while True:
        try:
            response = requests.get(URL + "/v1/metrics", headers=HEADERS)
            metrics = response.json()
            
            print(f"TPS: {metrics['tps']:.1f}, "
                  f"FTL: {metrics['ftl_ms']:.1f}ms, "
                  f"VRAM: {metrics['mem']['vram_gb']:.1f}GB, "
                  f"NPU: {metrics['util']['npu']:.1%}, "
                  f"iGPU: {metrics['util']['igpu']:.1%}")
            
        except Exception as e:
            print(f"監視エラー: {e}")
        
        time.sleep(1)

if __name__ == "__main__":
    monitor_metrics()
