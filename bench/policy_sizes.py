"""Real Mistral Small 4 file sizes per --type under both policies (no checkpoint needed): the README table."""
from quantize.arch import ATTN, EMBED, EXPERTS, NORM, OUTPUT, ROUTER, SHEXP, TensorJob
from quantize.policy import Policy, parse_type, nbytes
H,V,L,Nh,Lq,Lkv,Dn,Dr,Dv,E,F = 4096,131072,36,32,1024,256,64,64,128,128,2048
jobs=[]
def j(n,s,r,l=None): jobs.append(TensorJob(n,s,r,(),lambda: iter(()),l))
j("token_embd.weight",(V,H),EMBED)
for i in range(L):
    b=f"blk.{i}."
    j(b+"attn_norm.weight",(H,),NORM,i); j(b+"attn_q_a.weight",(Lq,H),ATTN,i); j(b+"attn_q_a_norm.weight",(Lq,),NORM,i)
    j(b+"attn_q_b.weight",(Nh*(Dn+Dr),Lq),ATTN,i); j(b+"attn_kv_a_mqa.weight",(Lkv+Dr,H),ATTN,i); j(b+"attn_kv_a_norm.weight",(Lkv,),NORM,i)
    j(b+"attn_k_b.weight",(Nh,Lkv,Dn),ATTN,i); j(b+"attn_v_b.weight",(Nh,Dv,Lkv),ATTN,i); j(b+"attn_output.weight",(H,Nh*Dv),ATTN,i)
    j(b+"ffn_norm.weight",(H,),NORM,i); j(b+"ffn_gate_inp.weight",(E,H),ROUTER,i)
    j(b+"ffn_gate_up_exps.weight",(E,2*F,H),EXPERTS,i); j(b+"ffn_down_exps.weight",(E,H,F),EXPERTS,i)
    j(b+"ffn_gate_shexp.weight",(F,H),SHEXP,i); j(b+"ffn_up_shexp.weight",(F,H),SHEXP,i); j(b+"ffn_down_shexp.weight",(H,F),SHEXP,i)
j("output_norm.weight",(H,),NORM); j("output.weight",(V,H),OUTPUT)
n=sum(x.n_elements for x in jobs)
print(f"params {n/1e9:.2f}B")
print("| type | ms4local GiB (bpw) | llama GiB (bpw) | + size |")
for t in ["Q8_0","Q6_K","Q5_K_M","Q5_K_S","Q4_K_M","Q4_K_S","IQ4_XS","Q4_0","Q3_K_M","Q2_K"]:
    ft=parse_type(t); r={}
    for pol in ("ms4local","llama"):
        P=Policy(ft,pol,[],jobs,L,E); tot=sum(nbytes(P.choose(x).type,x.shape) for x in jobs); r[pol]=tot
    print(f"| {t} | {r['ms4local']/2**30:.1f} ({8*r['ms4local']/n:.2f}) | {r['llama']/2**30:.1f} ({8*r['llama']/n:.2f}) | {100*(r['ms4local']/r['llama']-1):+.1f}% |")
