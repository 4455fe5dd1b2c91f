import requests
import time
import statistics
import os

URL = os.environ.get("INFEROS_AGENT_URL", "http://127.0.0.1:7031")
HEADERS = {"X-Inferos-Token": os.environ.get("INFEROS_AGENT_TOKEN", "")}

def run_ab_test():
    configs = [
        {"name": "Conservative", "kv": {"recent_window": 128}},
        {"name": "Balanced", "kv": {"recent_window": 64}},
        {"name": "Aggressive", "kv": {"recent_window": 32}}
    ]
    
    results = {}
    for config in configs:
        print(f"Testing {config['name']} configuration...")
        
        # 設定適用
        requests.post(URL + "/v1/policy", json=config, headers=HEADERS)
        time.sleep(2)  # 設定反映待ち
        
        # パフォーマンス測定
        metrics = []
        for _ in range(10):
            response = requests.get(URL + "/v1/metrics", headers=HEADERS)
            metrics.append(response.json())
            time.sleep(1)
        
        # 統計計算
        tps_values = [m['tps'] for m in metrics]
        results[config['name']] = {
            "avg_tps": statistics.mean(tps_values),
            "std_tps": statistics.stdev(tps_values),
            "avg_quality": statistics.mean([m['quality']['delta_ppl_est'] for m in metrics])
        }
    
    return results

if __name__ == "__main__":
    results = run_ab_test()
    for name, stats in results.items():
        print(f"{name}: TPS={stats['avg_tps']:.1f}±{stats['std_tps']:.1f}, Quality={stats['avg_quality']:.3f}")
