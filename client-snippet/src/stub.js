window.dataLayer=window.dataLayer||[];function gtag(){dataLayer.push(arguments)}
gtag("consent","default",{ad_storage:"denied",ad_user_data:"denied",ad_personalization:"denied",analytics_storage:"denied",functionality_storage:"granted",personalization_storage:"denied",security_storage:"granted",wait_for_update:500});
(function(w,q,r){w.Consent=w.Consent||{q:q,get:function(){return"unknown"},ready:new Promise(function(f){r=f}),
on:function(e,f){q.push(["on",e,f])},open:function(){q.push(["open"])}};w.Consent.r=r;setTimeout(function(){r("unknown")},4000)})(window,[]);
